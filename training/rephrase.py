"""Prompt rephraser (Phantom §3.3): rewrite the user's prompt so it names each reference subject with its
appearance, as the training captions do, which keeps similar subjects apart at inference.

Each reference image gets a description, from the user (``--ref-desc``), from the evaluation case's curated
subjects, or from a captioner backend (Qwen2.5-VL locally, or any OpenAI-compatible vision endpoint); an
LLM backend (curation.backends.llm: ``hf_llm``, offline SmolLM2-135M by default, or ``openai_compatible``)
rewrites the prompt given those descriptions. A reply that is not usable (empty, invalid JSON where JSON is
asked, not naming every subject, too long) is not used: the original prompt goes in, with the reason logged
and recorded.

    rephraser = Rephraser.from_config({"llm": {"name": "openai_compatible", "base_url": URL, "model": M}})
    result = rephraser.rephrase("a woman walks her dog", descriptions=["a young woman in a red coat", ...])
    result.prompt  # what the model gets
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REPLY_FORMATS = ("json", "text")

SYSTEM_PROMPT = (
    "You rewrite a prompt for a subject-to-video model. You get the reference subjects, each described by "
    "its appearance, and the user's prompt. Rewrite the prompt as one or two sentences that keep what "
    "happens in the prompt and name every reference subject with its appearance from its description, so "
    "no two subjects can be confused. Do not add subjects."
)
JSON_RULE = ' Reply with JSON only: {"prompt": "<the rewritten prompt>"}.'
TEXT_RULE = " Reply with the rewritten prompt only."

# Few-shot turns: small instruct models follow a demonstrated format far better than rules alone.
FEW_SHOT = [
    (
        ["a young woman with long black hair in a white dress", "a golden retriever with a red collar"],
        "a woman walks her dog on the beach",
        "A young woman with long black hair in a white dress walks a golden retriever with a red collar "
        "along the beach.",
    ),
    (
        ["a bald man in a blue shirt", "a man in a grey suit with glasses"],
        "two men shake hands in an office",
        "A bald man in a blue shirt shakes hands with a man in a grey suit with glasses in an office.",
    ),
]

DESCRIBE_PROMPT = (
    "Describe the main subject of this image in one short phrase that names it and its appearance "
    "(colours, clothing, hair, material), e.g. 'a young woman with short red hair in a denim jacket'. "
    "Reply with the phrase only."
)


@dataclasses.dataclass
class RephraseConfig:
    """``llm``: the chat backend (curation.backends.llm registry: hf_llm / openai_compatible) and its args;
    ``describer``: the captioner for reference images ({name: qwen2_5_vl, model_path} or {name:
    openai_compatible, base_url, model}); None means descriptions must be given."""

    llm: dict = dataclasses.field(default_factory=lambda: {"name": "hf_llm"})
    describer: dict | None = None
    reply_format: str = "json"
    max_chars: int = 600  # a longer rewrite is rejected (too_long)
    max_new_tokens: int = 160
    max_desc_chars: int = 200  # each description is cut to this before it goes into the prompt

    @classmethod
    def from_dict(cls, d: dict | None) -> RephraseConfig:
        from curation.config import ConfigError

        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ConfigError(f"rephrase: unknown key {bad[0]!r}; allowed: {sorted(names)}")
        cfg = cls(**d)
        if cfg.reply_format not in REPLY_FORMATS:
            raise ConfigError(
                f"rephrase.reply_format: {cfg.reply_format!r} is not one of {list(REPLY_FORMATS)}"
            )
        if not isinstance(cfg.llm, dict) or "name" not in cfg.llm:
            raise ConfigError(
                "rephrase.llm: expected a mapping with a backend `name` (hf_llm, openai_compatible)"
            )
        if cfg.describer is not None and (not isinstance(cfg.describer, dict) or "name" not in cfg.describer):
            raise ConfigError("rephrase.describer: expected a mapping with a backend `name`")
        if cfg.max_chars < 20 or cfg.max_new_tokens < 16:
            raise ConfigError("rephrase: max_chars must be >= 20 and max_new_tokens >= 16")
        return cfg


def load_rephrase_config(path: str | Path | None) -> RephraseConfig:
    """A YAML (safe_load) or JSON file with the RephraseConfig keys; None: the offline defaults."""
    if path is None:
        return RephraseConfig()
    from curation.config import load_yaml

    return RephraseConfig.from_dict(load_yaml(path) or {})


@dataclasses.dataclass
class RephraseResult:
    """What the model gets (``prompt``) and how it came about; ``reason`` is set when it fell back."""

    original: str
    prompt: str
    rewritten: str | None
    reason: str | None
    descriptions: list[str]
    description_origin: str
    backend: str
    raw_reply: str | None = None

    @property
    def rephrased(self) -> bool:
        return self.rewritten is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"rephrased": self.rephrased}


# ----------------------------------------------------------------------------- pure parts


def subject_line(descriptions: list[str]) -> str:
    return "\n".join(f"{k + 1}. {d}" for k, d in enumerate(descriptions))


def user_turn(descriptions: list[str], prompt: str) -> str:
    return f"Reference subjects:\n{subject_line(descriptions)}\nPrompt: {prompt}"


def build_conversation(descriptions: list[str], prompt: str, reply_format: str = "json") -> list[dict]:
    rule = JSON_RULE if reply_format == "json" else TEXT_RULE
    conv = [{"role": "system", "content": SYSTEM_PROMPT + rule}]
    for descs, p, rewrite in FEW_SHOT:
        reply = json.dumps({"prompt": rewrite}) if reply_format == "json" else rewrite
        conv += [{"role": "user", "content": user_turn(descs, p)}, {"role": "assistant", "content": reply}]
    conv.append({"role": "user", "content": user_turn(descriptions, prompt)})
    return conv


def _content(text: str) -> set[str]:
    from curation.parsing import STOP_WORDS, lower_words, singular

    return {singular(w) for w in lower_words(text) if w not in STOP_WORDS and len(w) > 1}


def names_subject(description: str, rewrite_words: set[str]) -> bool:
    """A rewrite names a subject when it has the head noun of its description ("woman" for "a young woman
    in a red coat"), or at least two of the description's content words (a model may say "a woman in a
    white spacesuit" for "a woman astronaut in a white spacesuit")."""
    from curation.parsing import head_noun, singular

    head = head_noun(description)
    if head is None or singular(head) in rewrite_words:
        return True
    return len(_content(description) & rewrite_words) >= 2


def check_reply(reply: str | None, descriptions: list[str], prompt: str, reply_format: str, max_chars: int):
    """(rewritten prompt, None) when the reply is usable, else (None, reason): ``empty``, ``invalid_json``,
    ``too_long``, ``missing_subject:<k>`` (the rewrite does not name reference k, 1-based), or
    ``lost_prompt`` (none of the prompt's own words, those not in any description, is left: the action
    went missing)."""
    from curation.parsing import extract_json

    text = (reply or "").strip()
    if not text:
        return None, "empty"
    if reply_format == "json":
        obj = extract_json(text)
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            return None, "invalid_json"
        text = obj["prompt"].strip()
        if not text:
            return None, "empty"
    else:
        text = text.strip().strip('"').strip()
        if text.lower().startswith("prompt:"):
            text = text[7:].strip()
    text = " ".join(text.split())
    if len(text) > max_chars:
        return None, "too_long"
    words = _content(text)
    for k, d in enumerate(descriptions):
        if not names_subject(d, words):
            return None, f"missing_subject:{k + 1}"
    own = _content(prompt) - set().union(*(_content(d) for d in descriptions))
    if own and not own & words:
        return None, "lost_prompt"
    return text, None


# ----------------------------------------------------------------------------- reference descriptions


def descriptions_from_subjects(subjects: list[dict], n_refs: int) -> list[str] | None:
    """Curated subjects (a shard sample's json / an evaluation case): their descriptions, one per
    reference; None when any is missing."""
    out = []
    for s in (subjects or [])[:n_refs]:
        d = (s.get("description") or s.get("name") or "").strip() if isinstance(s, dict) else ""
        if not d:
            return None
        out.append(d)
    return out if len(out) == n_refs else None


class OpenAIDescriber:
    """Reference descriptions from an OpenAI-compatible vision endpoint (e.g. vLLM serving Qwen2.5-VL);
    ``endpoint``: the OpenAIEndpoint settings (base_url, model, api_key_env, timeout_s, retries...)."""

    def __init__(self, max_new_tokens: int = 64, prompt: str = DESCRIBE_PROMPT, **endpoint):
        from curation.backends.openai_endpoint import OpenAIEndpoint

        self.client = OpenAIEndpoint(**endpoint)
        self.max_new_tokens, self.prompt = max_new_tokens, prompt
        self.name = self.client.name

    def describe(self, images: list[np.ndarray]) -> list[str]:
        from curation.backends.openai_endpoint import image_conversation

        convs = [image_conversation([img], self.prompt) for img in images]
        # One request per reference, in order (1-4 of them: concurrency would buy little here).
        return [self.client.chat(c, self.max_new_tokens).strip() for c in convs]


class QwenVLDescriber:
    """Reference descriptions from a local Qwen2.5-VL, through the curation captioner's loader and batched
    greedy ``generate`` (``kw``: its models_dir, device, batch_size)."""

    def __init__(
        self,
        model_path: str,
        prompt: str = DESCRIBE_PROMPT,
        max_new_tokens: int = 64,
        max_pixels: int = 512 * 28 * 28,
        **kw,
    ):
        from curation.backends.qwen_vl import QwenVLCaptioner

        self.vl = QwenVLCaptioner(model_path, max_new_tokens=max_new_tokens, **kw)
        self.prompt, self.max_pixels = prompt, max_pixels
        self.name = f"qwen2_5_vl:{model_path}"

    def describe(self, images: list[np.ndarray]) -> list[str]:
        from PIL import Image

        convs = [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": Image.fromarray(img), "max_pixels": self.max_pixels},
                        {"type": "text", "text": self.prompt},
                    ],
                }
            ]
            for img in images
        ]
        out: list[str] = []
        for i in range(0, len(convs), self.vl.batch_size):
            out += self.vl.generate(convs[i : i + self.vl.batch_size])[0]
        return out


DESCRIBERS = {"qwen2_5_vl": QwenVLDescriber, "openai_compatible": OpenAIDescriber}


def build_describer(cfg: dict):
    cfg = dict(cfg)
    name = cfg.pop("name")
    if name not in DESCRIBERS:
        raise ValueError(f"rephrase.describer: unknown backend {name!r}; allowed: {sorted(DESCRIBERS)}")
    return DESCRIBERS[name](**cfg)


# ----------------------------------------------------------------------------- the rephraser


class Rephraser:
    """The LLM (and describer) built once; ``rephrase`` per prompt. Never raises for a bad reply or an
    unreachable backend: the result then carries the original prompt and the reason."""

    def __init__(self, cfg: RephraseConfig, llm=None, describer=None) -> None:
        self.cfg = cfg
        self._llm, self._describer = llm, describer

    @classmethod
    def from_config(cls, cfg: RephraseConfig | dict | None = None) -> Rephraser:
        return cls(cfg if isinstance(cfg, RephraseConfig) else RephraseConfig.from_dict(cfg))

    @property
    def llm(self):
        if self._llm is None:
            from curation.backends import llm as _  # noqa: F401  (registers hf_llm, openai_compatible)
            from curation.stage import build_backend

            kw = dict(self.cfg.llm)
            self._llm = build_backend("subject_extractor", kw.pop("name"), **kw)
        return self._llm

    @property
    def describer(self):
        if self._describer is None and self.cfg.describer is not None:
            self._describer = build_describer(self.cfg.describer)
        return self._describer

    def describe(self, images: list[np.ndarray]) -> list[str]:
        if self.describer is None:
            raise ValueError(
                "rephrase: no reference descriptions; pass one --ref-desc per --ref, or configure "
                "rephrase.describer (qwen2_5_vl or openai_compatible)"
            )
        return self.describer.describe(images)

    def _fallback(self, prompt, reason, descs, origin, raw=None) -> RephraseResult:
        log.warning("rephrase: keeping the original prompt (%s)", reason)
        return RephraseResult(prompt, prompt, None, reason, descs, origin, self._llm_name(), raw)

    def _llm_name(self) -> str:
        return str(getattr(self._llm, "name", self.cfg.llm.get("name")))

    def rephrase(
        self,
        prompt: str,
        descriptions: list[str] | None = None,
        images: list[np.ndarray] | None = None,
    ) -> RephraseResult:
        """``descriptions`` (one per reference) as given, else from the describer on ``images``."""
        origin = "given"
        if not descriptions:
            origin = "describer"
            if self.cfg.describer is None and self._describer is None:
                self.describe([])  # raises: saying how to provide descriptions
            try:
                descriptions = self.describe(list(images or []))
            except Exception as e:  # noqa: BLE001 - an unreachable describer is a recorded reason
                return self._fallback(
                    prompt, f"describer_error:{type(e).__name__}: {str(e)[:120]}", [], origin
                )
        descs = [" ".join(str(d).split())[: self.cfg.max_desc_chars] for d in descriptions]
        if not descs or not all(descs):
            return self._fallback(prompt, "no_description", descs, origin)
        conv = build_conversation(descs, prompt, self.cfg.reply_format)
        try:
            (reply,) = self.llm.chat(
                [conv], max_new_tokens=self.cfg.max_new_tokens, stop_at_json=self.cfg.reply_format == "json"
            )
        except Exception as e:  # noqa: BLE001 - HTTP errors, timeouts: the prompt goes in as typed
            return self._fallback(prompt, f"backend_error:{type(e).__name__}: {str(e)[:120]}", descs, origin)
        rewritten, reason = check_reply(reply, descs, prompt, self.cfg.reply_format, self.cfg.max_chars)
        if rewritten is None:
            return self._fallback(prompt, reason, descs, origin, reply)
        log.info("rephrase: %r -> %r", prompt, rewritten)
        return RephraseResult(prompt, rewritten, rewritten, None, descs, origin, self._llm_name(), reply)


def rephrase_case(rephraser: Rephraser, prompt: str, refs: list[np.ndarray], subjects: list[dict]):
    """For the evaluation: the case's curated subject descriptions when it has one per reference, else the
    describer on its reference images; never raises (no descriptions at all is the reason
    ``no_description``)."""
    descs = descriptions_from_subjects(subjects, len(refs))
    if descs is None and rephraser.cfg.describer is None and rephraser._describer is None:
        return rephraser._fallback(prompt, "no_description", [], "none")
    return rephraser.rephrase(prompt, descriptions=descs, images=refs)


def prompt_record_path(out: str | Path) -> Path:
    """Where a rephrased prompt is stored beside an output: x.mp4 -> x.mp4.prompt.json."""
    out = Path(out)
    return out.with_name(out.name + ".prompt.json")


def write_prompt_record(out: str | Path, result: RephraseResult) -> Path:
    from curation.shards import atomic_write_json

    path = prompt_record_path(out)
    atomic_write_json(path, result.to_dict())
    return path
