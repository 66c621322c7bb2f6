"""Scenario labels on hand-built subject sets, primary scenario, weights (curation/scenarios.py)."""

from __future__ import annotations

import pytest

from curation import scenarios as S
from curation.config import ConfigError
from curation.global_phase import ShardParams


@pytest.mark.parametrize(
    "cats, caption, want, primary",
    [
        (["human"], "A man talks.", ["people"], "people"),
        (["human", "human"], "Two women dance.", ["people", "multi_person"], "multi_person"),
        (["human", "animal"], "A girl pets her dog.", ["people", "animals", "human_pet"], "human_pet"),
        (["human", "product"], "A man holds a cup.", ["people", "objects", "human_object"], "human_object"),
        (
            ["human", "human", "animal"],
            "",
            ["people", "animals", "multi_person", "human_pet"],
            "multi_person",
        ),
        (["animal"], "A cat on a beach.", ["animals", "backgrounds"], "animals"),
        (["landmark"], "The tower at night.", ["backgrounds"], "backgrounds"),
        (["clothes", "ip_character"], "", ["objects"], "objects"),
        ([], "", [], "objects"),
    ],
)
def test_labels_from_subjects_categories_and_caption(cats, caption, want, primary):
    got = S.labels(cats, caption)
    assert got == want and S.primary(got) == primary


def test_weights_keep_a_fraction_and_never_drop_a_rarer_label():
    keys = [f"k{i}" for i in range(3000)]
    people = sum(S.keep_by_weight({"people": 0.2}, ["people"], k) for k in keys)
    assert 450 < people < 750
    assert all(S.keep_by_weight({"people": 0.2}, ["people", "human_pet"], k) for k in keys)
    assert not any(S.keep_by_weight({"people": 0.0}, ["people"], k) for k in keys)


def test_write_shards_params_validate_scenario_names_and_weights():
    ShardParams(scenario_weights={"people": 0.5}, scenario_quotas={"multi_person": 10}).validate("w")
    with pytest.raises(ConfigError, match="unknown scenario 'humans'"):
        ShardParams(scenario_quotas={"humans": 3}).validate("w")
    with pytest.raises(ConfigError, match="out of range"):
        ShardParams(category_weights={"human": 2.0}).validate("w")
    with pytest.raises(ConfigError, match="must differ"):
        ShardParams(eval_subdir="shards").validate("w")
