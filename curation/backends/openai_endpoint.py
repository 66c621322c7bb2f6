"""The one OpenAI-compatible chat-completions client (vLLM / SGLang servers) every remote backend uses."""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class OpenAIError(RuntimeError):
    """The server answered with an error or an unexpected body."""


class OpenAIEndpoint:
    """POST ``{base_url}/chat/completions`` for ``model``; the API key is read from the environment variable
    ``api_key_env`` (never from the YAML). Retries transient failures (HTTP 429/5xx, timeouts) up to
    ``max_retries`` times, waiting ``retry_wait_s`` doubled each time; ``chat_many`` keeps at most
    ``max_concurrency`` requests in flight.

    A backend that talks to such a server takes these settings as keyword arguments of its own (its YAML
    ``backend:`` mapping) and passes them on: ``OpenAIEndpoint(**endpoint)``."""

    def __init__(
        self,
        base_url: str = "",
        model: str = "",
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 120.0,
        max_retries: int = 2,
        retry_wait_s: float = 1.0,
        max_concurrency: int = 8,
    ):
        if not base_url:
            raise ValueError("openai_compatible backend needs base_url (e.g. http://127.0.0.1:8000/v1)")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.name = f"{model}@{base_url}"
        self.api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.retry_wait_s = retry_wait_s
        self.max_concurrency = max_concurrency

    def chat(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.0) -> str:
        """The reply text to one conversation ``[{role, content}]``."""
        body = json.dumps(
            {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                return _message_text(data)
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                last = OpenAIError(f"HTTP {e.code} from {self.url}: {detail}")
                if e.code != 429 and e.code < 500:
                    raise last from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = OpenAIError(f"cannot reach {self.url}: {e}")
            if attempt < self.max_retries:
                time.sleep(self.retry_wait_s * (2**attempt))
        raise last  # type: ignore[misc]

    def chat_many(
        self, conversations: list[list[dict]], max_tokens: int = 256, temperature: float = 0.0
    ) -> list[str]:
        """Several requests in flight at once (the server batches them), replies in input order."""
        if len(conversations) <= 1:
            return [self.chat(c, max_tokens, temperature) for c in conversations]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(conversations))) as pool:
            return list(pool.map(lambda c: self.chat(c, max_tokens, temperature), conversations))


def _message_text(data: dict) -> str:
    """The assistant's text in a chat-completion response body (content parts joined)."""
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise OpenAIError(f"unexpected chat completion body: {str(data)[:300]}") from None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def image_part(frame_rgb: np.ndarray, jpeg_quality: int = 90) -> dict:
    """An ``image_url`` content part carrying an RGB uint8 (H, W, 3) frame as a base64 JPEG data URL."""
    import cv2

    ok, buf = cv2.imencode(".jpg", frame_rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return {
        "type": "image_url",
        "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(buf).decode()},
    }


def image_conversation(frames_rgb: list[np.ndarray], text: str) -> list[dict]:
    """A one-turn conversation: the user sends the frames (as JPEG ``image_url`` parts), then ``text``."""
    return [
        {"role": "user", "content": [*(image_part(f) for f in frames_rgb), {"type": "text", "text": text}]}
    ]
