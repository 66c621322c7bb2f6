"""Stage ``subjects``: an LLM extracts the caption's subjects with appearance descriptions and categories."""

from __future__ import annotations

import dataclasses
from typing import Protocol

from curation.config import field
from curation.parsing import CATEGORIES, parse_subjects
from curation.stage import Record, Stage, build_backend, register_stage, reject

SYSTEM_PROMPT = (
    "You extract the subjects from a video caption. Reply with a JSON list only, no prose. One item per "
    'distinct visible subject: {"name": the subject\'s noun as written in the caption, "description": its '
    'appearance and behaviour in the caption\'s words, "category": one of '
    + ", ".join(CATEGORIES)
    + "}. Similar subjects get distinct descriptions. Skip the background and abstract things."
)

# Few-shot turns: small instruct models (SmolLM2-135M) follow demonstrated format much better than rules.
FEW_SHOT = [
    (
        "A young woman with long black hair, wearing a white dress, walks her golden retriever along a sandy "
        "beach at sunset.",
        '[{"name": "woman", "description": "young woman with long black hair in a white dress, walking", '
        '"category": "human"}, {"name": "dress", "description": "white dress", "category": "clothes"}, '
        '{"name": "golden retriever", "description": "golden retriever dog walking on the sand", '
        '"category": "animal"}]',
    ),
    (
        "Two men talk in an office. The man in a grey suit holds a red smartphone, while the bald "
        "man in a blue "
        "shirt sits at a desk.",
        '[{"name": "man in a grey suit", "description": "man in a grey suit holding a phone", "category": '
        '"human"}, {"name": "bald man", "description": "bald man in a blue shirt sitting at a desk", '
        '"category": "human"}, {"name": "smartphone", "description": "red smartphone", "category": '
        '"product"}]',
    ),
]

RETRY_PROMPT = (
    "That reply was not a valid list of subjects from the caption. Reply again with only the JSON list, "
    "using nouns that appear in the caption."
)


class SubjectExtractor(Protocol):
    """Capability ``subject_extractor``: one reply per chat conversation ([{role, content}])."""

    def chat(self, conversations: list[list[dict]], max_new_tokens: int | None = None) -> list[str]: ...


def build_conversation(caption: str) -> list[dict]:
    conv = [{"role": "system", "content": SYSTEM_PROMPT}]
    for cap, reply in FEW_SHOT:
        conv += [{"role": "user", "content": f"Caption: {cap}"}, {"role": "assistant", "content": reply}]
    conv.append({"role": "user", "content": f"Caption: {caption}"})
    return conv


@register_stage("subjects")
class SubjectsStage(Stage):
    """Adds ``subjects`` [{name, description, category, category_source}] (and ``subjects_dropped``); the
    category is the LLM's unless the documented category rule of curation.parsing fires; rejects with
    ``subjects:parse_failed`` (raw replies kept in ``subjects_raw``), ``subjects:none`` or
    ``subjects:unsupported`` (every name missing from the caption)."""

    uses_model = True
    reads_clips = True

    @dataclasses.dataclass
    class Params:
        max_subjects: int = field(6, ge=1, le=32)
        max_new_tokens: int = field(256, ge=16, le=4096)
        retries: int = field(1, ge=0, le=3)
        require_in_caption: bool = True  # drop subjects whose head noun is not in the caption
        max_caption_chars: int = field(2000, ge=50)

    def setup(self) -> None:
        from curation.backends import llm  # noqa: F401  (registers the subject_extractor backends)

        cfg = dict(self.backend_cfg)
        name = cfg.pop("name", "hf_llm")
        self.backend: SubjectExtractor = build_backend(
            "subject_extractor", name, models_dir=self.ctx.models_dir, **cfg
        )
        self.backend_name = name

    def process(self, rows: list[Record]) -> list[Record]:
        p = self.params
        out: dict[int, Record] = {}
        convs: dict[int, list[dict]] = {}
        raws: dict[int, list[str]] = {}
        for i, row in enumerate(rows):
            caption = (row.get("caption") or "").strip()
            if not caption:
                out[i] = reject(row, "subjects:no_caption")
            else:
                convs[i] = build_conversation(caption[: p.max_caption_chars])
        for _attempt in range(p.retries + 1):
            if not convs:
                break
            keys = list(convs)
            replies = self.backend.chat([convs[k] for k in keys], p.max_new_tokens)
            for k, reply in zip(keys, replies):
                raws.setdefault(k, []).append(reply)
                row = rows[k]
                res = parse_subjects(reply, row["caption"] if p.require_in_caption else None, p.max_subjects)
                if res.error is None:
                    out[k] = {
                        **row,
                        "subjects": res.subjects,
                        "subjects_dropped": res.dropped,
                        "subjects_backend": self.backend_name,
                        "subjects_attempts": len(raws[k]),
                    }
                    del convs[k]
                else:
                    # Retry with the bad reply in context and a correction: greedy decoding would repeat it.
                    convs[k] = convs[k] + [
                        {"role": "assistant", "content": reply},
                        {"role": "user", "content": RETRY_PROMPT},
                    ]
                    out[k] = reject(
                        row,
                        f"subjects:{_reason(res.error)}",
                        subjects=[],
                        subjects_raw=raws[k],
                        subjects_dropped=res.dropped,
                        subjects_backend=self.backend_name,
                    )
        return [out[i] for i in range(len(rows))]


def _reason(error: str) -> str:
    return {"no_json": "parse_failed", "not_a_list": "parse_failed", "no_subjects": "none"}.get(error, error)
