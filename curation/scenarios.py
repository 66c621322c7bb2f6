"""Scenario labels of a triplet (Phantom §3: data segmented by application scenario so that missing kinds can
be supplemented quantitatively): a small fixed taxonomy computed from the subjects, their categories and the
caption, plus the deterministic keep rule behind per-scenario weights and quotas."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

# Subject kinds, then interactions. Order matters: the primary scenario of a sample is the first label of
# PRIMARY_ORDER it carries (the most specific one), so quotas count each sample once.
KINDS = ("people", "animals", "objects", "backgrounds")
INTERACTIONS = ("multi_person", "human_pet", "human_object")
TAXONOMY = KINDS + INTERACTIONS
PRIMARY_ORDER = ("multi_person", "human_pet", "human_object", "people", "animals", "objects", "backgrounds")

# curation.parsing.CATEGORIES -> subject kind
KIND_OF_CATEGORY = {
    "human": "people",
    "animal": "animals",
    "clothes": "objects",
    "product": "objects",
    "ip_character": "objects",
    "other": "objects",
    "landmark": "backgrounds",
}

# A caption naming its setting makes the sample a background sample as well (the paper's "backgrounds":
# the scene itself is a subject worth conditioning on).
_SETTING_WORDS = re.compile(
    r"\b(landscape|scenery|skyline|street|road|beach|coast|ocean|sea|lake|river|waterfall|mountains?|hills?|"
    r"forest|woods|jungle|desert|field|meadow|garden|park|city|town|village|room|kitchen|office|stadium|"
    r"sky|sunset|sunrise|snow|countryside)\b",
    re.IGNORECASE,
)


def subject_kind(category: str | None) -> str:
    return KIND_OF_CATEGORY.get(str(category or "other"), "objects")


def labels(categories: Iterable[str | None], caption: str | None = "") -> list[str]:
    """Every taxonomy label that applies to a sample with subjects of these ``categories`` (one entry per
    subject, repeats meaningful) and this caption, in TAXONOMY order."""
    kinds = [subject_kind(c) for c in categories]
    n_people = kinds.count("people")
    got = set(kinds)
    if caption and _SETTING_WORDS.search(caption):
        got.add("backgrounds")
    if n_people >= 2:
        got.add("multi_person")
    if n_people >= 1 and "animals" in kinds:
        got.add("human_pet")
    if n_people >= 1 and "objects" in kinds:
        got.add("human_object")
    return [t for t in TAXONOMY if t in got]


def primary(scenario_labels: Iterable[str]) -> str:
    """The most specific label (PRIMARY_ORDER); ``objects`` when there is none (a sample always has one)."""
    s = set(scenario_labels)
    return next((t for t in PRIMARY_ORDER if t in s), "objects")


def unit_draw(*key) -> float:
    """A deterministic uniform draw in [0, 1) from a key (sha1, so stable across processes and runs)."""
    h = hashlib.sha1("\x1f".join(str(k) for k in key).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def keep_by_weight(
    weights: dict[str, float], scenario_labels: Iterable[str], key: str, seed: int = 0
) -> bool:
    """A sample is kept with probability max(weight of its labels) (labels without a weight count 1.0), so
    capping ``people`` keeps a rarer ``human_pet`` sample that also carries ``people``."""
    ls = list(scenario_labels) or ["objects"]
    w = max(float(weights.get(t, 1.0)) for t in ls)
    return w >= 1.0 or unit_draw("scenario", seed, key) < w


def validate_names(names: Iterable[str], path: str) -> None:
    from curation.config import ConfigError

    bad = sorted(set(names) - set(TAXONOMY))
    if bad:
        raise ConfigError(f"{path}: unknown scenario {bad[0]!r}; allowed: {list(TAXONOMY)}")
