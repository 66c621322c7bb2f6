"""Robust parsers for model replies (JSON in prose, subjects, bbox_2d boxes) and the reference-box rules.

A subject's category is the LLM's own label (``normalize_category``: schema names and their synonyms;
anything else is ``other``), recorded as ``category_source: "llm"``, unless the one category rule fires:
the subject's head noun (``head_noun``) is one of ``RULE_NOUNS``, generic nouns whose category is never in
doubt ("dog", "bus", "nurse"), the LLM said something else, and the LLM did not say ``ip_character`` (a
character is often named by what it looks like: "cartoon dog"). The noun's category is then used,
recorded as ``category_source: "rule"`` with the LLM's label kept in ``category_llm``. ``RULE_NOUNS``
holds no noun of the bundled sample's footage, so the sample's categories are the LLM's own.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any

from curation.boxes import box_iou

CATEGORIES = ("human", "animal", "clothes", "product", "landmark", "ip_character", "other")

# Words LLMs use instead of our category names. Anything not here and not a category maps to "other".
_CATEGORY_SYNONYMS = {
    "person": "human",
    "people": "human",
    "man": "human",
    "woman": "human",
    "child": "human",
    "boy": "human",
    "girl": "human",
    "humans": "human",
    "persons": "human",
    "face": "human",
    "animals": "animal",
    "pet": "animal",
    "dog": "animal",
    "cat": "animal",
    "bird": "animal",
    "clothing": "clothes",
    "garment": "clothes",
    "apparel": "clothes",
    "outfit": "clothes",
    "cloth": "clothes",
    "accessory": "clothes",
    "object": "product",
    "item": "product",
    "products": "product",
    "vehicle": "product",
    "device": "product",
    "building": "landmark",
    "place": "landmark",
    "location": "landmark",
    "scene": "landmark",
    "ip character": "ip_character",
    "ip-character": "ip_character",
    "character": "ip_character",
    "cartoon": "ip_character",
    "cartoon character": "ip_character",
    "ip": "ip_character",
    "others": "other",
}

_FENCE = re.compile(r"```(?:json|JSON|python)?\s*(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")


def _balanced_spans(text: str) -> list[str]:
    """Every top-level ``[...]`` or ``{...}`` span in ``text`` (string-aware), in order of appearance."""
    spans, depth, start, in_str, esc, quote = [], 0, -1, False, False, ""
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == quote:
                in_str = False
            continue
        if ch == '"' or (ch == "'" and depth > 0 and _opens_string(text, i)):
            in_str, quote = True, ch
        elif ch in "[{":
            if depth == 0:
                start = i
            depth += 1
        elif ch in "]}" and depth > 0:
            depth -= 1
            if depth == 0:
                spans.append(text[start : i + 1])
    if depth > 0 and start >= 0:
        spans.append(text[start:])  # truncated reply (max_new_tokens hit): try to close it below
    return spans


def _outside_strings(text: str):
    """(index, char) of every character outside double-quoted strings, honouring backslash escapes."""
    in_str = esc = False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        else:
            yield i, ch


def json_closed(text: str) -> bool:
    """True once ``text`` holds a complete top-level JSON list/object (generation can stop there)."""
    depth = 0
    for _, ch in _outside_strings(text):
        if ch in "[{":
            depth += 1
        elif ch in "]}" and depth > 0:
            depth -= 1
            if depth == 0:
                return True
    return False


def _opens_string(text: str, i: int) -> bool:
    # A single quote opens a string only after a structural char (so "man's" inside prose does not).
    j = i - 1
    while j >= 0 and text[j] in " \t\r\n":
        j -= 1
    return j >= 0 and text[j] in "[{,:"


def _close_truncated(s: str) -> str:
    """Close a reply cut at max_new_tokens: keep up to the last complete object, then close open brackets."""
    cut = s.rfind("}")
    body = s[: cut + 1] if cut > 0 else s
    closers: list[str] = []
    for _, ch in _outside_strings(body):
        if ch in "[{":
            closers.append("]" if ch == "[" else "}")
        elif ch in "]}" and closers:
            closers.pop()
    return body.rstrip().rstrip(",") + "".join(reversed(closers))


def _segments(text: str) -> list[tuple[bool, str]]:
    """``text`` split into (is_string, chunk) pieces: double-quoted strings, and single-quoted ones where a
    quote opens a string (``_opens_string``), backslash escapes honoured; an unclosed string runs to the
    end."""
    out, start, quote, i, n = [], 0, "", 0, len(text)
    while i < n:
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                out.append((True, text[start : i + 1]))
                start, quote = i + 1, ""
        elif ch == '"' or (ch == "'" and _opens_string(text, i)):
            if i > start:
                out.append((False, text[start:i]))
            start, quote = i, ch
        i += 1
    if start < n:
        out.append((bool(quote), text[start:]))
    return out


_PY_WORDS = {"true": "True", "false": "False", "null": "None"}
_JSON_WORD = re.compile(r"\b(true|false|null)\b")


def _repair(s: str, python_literals: bool = False) -> str:
    """Outside strings only: drop a trailing comma before ``]``/``}``; with ``python_literals`` also spell
    JSON's true/false/null the Python way. String contents are never touched."""
    parts = []
    for is_str, chunk in _segments(s):
        if not is_str:
            chunk = _TRAILING_COMMA.sub(r"\1", chunk)
            if python_literals:
                chunk = _JSON_WORD.sub(lambda m: _PY_WORDS[m.group(1)], chunk)
        parts.append(chunk)
    return "".join(parts)


def _loads_lenient(s: str) -> Any:
    """json.loads, then with trailing commas removed, then as a Python literal (single quotes, True/None)."""
    for cand in (s, _repair(s)):
        try:
            return json.loads(cand)
        except (json.JSONDecodeError, ValueError):
            pass
    try:
        # literal_eval only builds literals (no calls, no names), so it is safe on model output.
        return ast.literal_eval(_repair(s, python_literals=True))
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None


def extract_json(text: str | None) -> Any:
    """The first JSON value found in a model reply: inside code fences or prose, tolerating trailing commas,
    single quotes, Python literals and a reply truncated mid-list. None when there is none."""
    if not text or not isinstance(text, str):
        return None
    text = text.strip()
    candidates = [m.group(1).strip() for m in _FENCE.finditer(text)]
    if "```" in text and not candidates:  # an opening fence with no closing one (truncated reply)
        candidates.append(text.split("```", 1)[1].lstrip("json").lstrip("JSON"))
    candidates.append(text)
    for cand in candidates:
        val = _loads_lenient(cand)
        if isinstance(val, (list, dict)):
            return val
        for span in _balanced_spans(cand):
            val = _loads_lenient(span)
            if val is None:
                val = _loads_lenient(_close_truncated(span))
            if isinstance(val, (list, dict)):
                return val
    return None


# ---------------------------------------------------------------------------------------------------------
# Subjects


def normalize_category(value: Any) -> str:
    """A category name from the schema; synonyms are mapped, anything unknown becomes ``other``."""
    c = str(value or "").strip().lower().replace("_", " ")
    c = re.sub(r"\s+", " ", c)
    if c.replace(" ", "_") in CATEGORIES:
        return c.replace(" ", "_")
    return _CATEGORY_SYNONYMS.get(c, "other")


# Function words left out when subject names and prompts are compared word by word.
STOP_WORDS = {
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "with",
    "and",
    "his",
    "her",
    "their",
    "its",
    "this",
    "that",
    "to",
    "at",
    "by",
    "for",
    "from",
    "some",
    "two",
    "three",
    "one",
    "another",
    "other",
    "is",
    "are",
    "who",
}


def lower_words(text: str) -> list[str]:
    """The lower-case alphanumeric words of ``text``, in order."""
    return re.findall(r"[a-z0-9]+", text.lower())


def singular(w: str) -> str:
    """Plural -> singular, enough for "dogs"/"dog", "women"/"woman", "glasses"/"glass", "puppies"/"puppy"."""
    if w.endswith("men"):
        return w[:-3] + "man"
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("ses", "xes", "ches", "shes")):
        return w[:-2]
    if w.endswith("s") and not w.endswith("ss") and len(w) > 3:
        return w[:-1]
    return w


# The category rule's nouns (module docstring): generic head nouns with one obvious category. Small LLMs
# (SmolLM2-135M) often mislabel them ("bicycle": clothes), and a wrong category hides a subject from its
# partners (pairs never cross categories) and from the face and human-only grounding steps. No noun of the
# bundled sample's footage is listed (tests/curation/test_parsing.py checks), so the sample measures the LLM.
RULE_NOUNS = {
    "human": "boy girl child kid baby toddler teenager adult guy lady gentleman player athlete dancer singer "
    "chef doctor nurse student teacher reporter soldier policeman policewoman firefighter driver rider "
    "skier surfer runner swimmer musician guitarist drummer pianist actor actress bride groom farmer "
    "fisherman mother father son daughter grandmother grandfather businessman businesswoman hiker "
    "skateboarder",
    "animal": "dog puppy kitten horse cow sheep goat pig chicken duck goose deer bear lion tiger elephant "
    "monkey fish shark whale dolphin turtle snake lizard frog butterfly bee spider squirrel fox wolf "
    "giraffe zebra camel parrot owl eagle penguin hamster pony calf lamb retriever labrador poodle "
    "bulldog terrier",
    "clothes": "dress skirt jacket coat pants jeans sweater hoodie hat scarf shoe sneaker boot glove "
    "blouse vest raincoat apron sunglasses necklace backpack handbag",
    "product": "bus truck motorcycle phone smartphone laptop computer monitor mug bottle plate bowl knife "
    "guitar piano ball toy book umbrella chair sofa lamp microphone headphone tablet keyboard boat "
    "train airplane drone pen teapot",
    "landmark": "tower bridge temple church cathedral castle palace statue monument pyramid skyscraper "
    "stadium lighthouse fountain",
}
_RULE_INDEX = {w: cat for cat, words in RULE_NOUNS.items() for w in words.split()}


_CUT = {"in", "with", "on", "of", "at", "wearing", "holding", "who", "that", "from", "near", "under", "by"}


def head_noun(name: str) -> str | None:
    """The head noun of a subject name: the last content word before any prepositional phrase
    ("man in a grey suit" -> "man", "cup of coffee" -> "cup")."""
    words = lower_words(name)
    for i, w in enumerate(words):
        if w in _CUT and i > 0:
            words = words[:i]
            break
    content = [w for w in words if w not in STOP_WORDS]
    return content[-1] if content else None


def rule_category(name: str) -> str | None:
    """The category of the subject's head noun when it is in ``RULE_NOUNS`` (plurals folded), else None."""
    head = head_noun(name)
    if head is None:
        return None
    return _RULE_INDEX.get(head) or _RULE_INDEX.get(singular(head))


def categorize(name: str, label: Any) -> tuple[str, str]:
    """(category, source) of a subject from the LLM's (or a dataset's) ``label``: ``(label, "llm")``, or
    ``(noun's category, "rule")`` when the category rule of the module docstring fires."""
    given = normalize_category(label)
    ruled = rule_category(name)
    if ruled is None or ruled == given or given == "ip_character":
        return given, "llm"
    return ruled, "rule"


def supported_by_caption(name: str, caption: str) -> bool:
    """True when the subject's head noun (``head_noun``) occurs in the caption (plurals folded)."""
    head = head_noun(name)
    return head is not None and singular(head) in {singular(w) for w in lower_words(caption)}


@dataclass
class SubjectParse:
    """One parsed extractor reply: valid subjects, dropped ones with reasons, and an error code."""

    subjects: list[dict]
    dropped: list[dict]
    error: str | None  # None, "no_json", "not_a_list", "no_subjects", "unsupported"


def parse_subjects(
    text: str | None, caption: str | None = None, max_subjects: int = 8, category_rule: bool = True
) -> SubjectParse:
    """Parse and validate a subject list ``[{name, description, category}]`` from an LLM reply.

    Accepts a bare list, ``{"subjects": [...]}`` or a single subject object; strings become names. Names are
    deduplicated; unknown categories become ``other``; with ``caption`` given, a subject whose head noun is
    not in the caption is dropped (reason ``not_in_caption``). Each subject records ``category_source``:
    "llm", or "rule" (with the model's label in ``category_llm``) where ``category_rule`` is on and the
    category rule of the module docstring fires."""
    val = extract_json(text)
    if val is None:
        return SubjectParse([], [], "no_json")
    if isinstance(val, dict):
        inner = next((val[k] for k in ("subjects", "objects", "entities", "items") if k in val), None)
        val = inner if inner is not None else ([val] if "name" in val else None)
    if not isinstance(val, list):
        return SubjectParse([], [], "not_a_list")
    subjects, dropped, seen = [], [], set()
    for item in val:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            dropped.append({"item": str(item)[:80], "reason": "not_an_object"})
            continue
        name = str(item.get("name") or item.get("subject") or "").strip().strip(".").strip()
        if not name or len(name) > 80:
            dropped.append({"item": str(item)[:80], "reason": "bad_name"})
            continue
        key = name.lower()
        if key in seen:
            dropped.append({"name": name, "reason": "duplicate"})
            continue
        if caption is not None and not supported_by_caption(name, caption):
            dropped.append({"name": name, "reason": "not_in_caption"})
            continue
        seen.add(key)
        desc = item.get("description") or item.get("appearance") or ""
        label = item.get("category") or item.get("type")
        category, source = categorize(name, label) if category_rule else (normalize_category(label), "llm")
        subject = {
            "name": name,
            "description": str(desc).strip() or name,
            "category": category,
            "category_source": source,
        }
        if source == "rule":
            subject["category_llm"] = normalize_category(label)
        subjects.append(subject)
    subjects = subjects[:max_subjects]
    if subjects:
        return SubjectParse(subjects, dropped, None)
    unsupported = any(d.get("reason") == "not_in_caption" for d in dropped)
    return SubjectParse([], dropped, "unsupported" if unsupported else "no_subjects")


# ---------------------------------------------------------------------------------------------------------
# Boxes

# Qwen2-VL style reply "<|box_start|>(x0,y0),(x1,y1)<|box_end|>" (0-1000 normalised).
_QWEN2_BOX = re.compile(
    r"\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)\s*,\s*"
    r"\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)"
)


def _as_box(v: Any) -> list[float] | None:
    if isinstance(v, (list, tuple)) and len(v) == 4:
        try:
            return [float(x) for x in v]
        except (TypeError, ValueError):
            return None
    if isinstance(v, dict) and all(k in v for k in ("x1", "y1", "x2", "y2")):
        return _as_box([v["x1"], v["y1"], v["x2"], v["y2"]])
    return None


def parse_bbox_reply(text: str | None) -> list[dict]:
    """Boxes in a grounding reply: ``[{"bbox_2d": [x0,y0,x1,y1], "label": ..}]`` (also ``bbox``/``box`` keys,
    a single object, a bare 4-list, and Qwen2-VL's ``(x0,y0),(x1,y1)``). Each: {box, label, complete,
    raw_mode}
    where raw_mode is "qwen2_norm1000" for the parenthesised form and "json" otherwise."""
    out: list[dict] = []
    val = extract_json(text)
    items: list = []
    if isinstance(val, dict):
        items = [val]
    elif isinstance(val, list):
        items = [val] if _as_box(val) is not None else val
    for it in items:
        if isinstance(it, dict):
            box = next((_as_box(it[k]) for k in ("bbox_2d", "bbox", "box", "box_2d") if k in it), None)
            if box is None:
                box = _as_box(it)
            if box is None:
                continue
            complete = it.get("complete")
            out.append(
                {
                    "box": box,
                    "label": str(it.get("label", "")),
                    "complete": complete if isinstance(complete, bool) else None,
                    "raw_mode": "json",
                }
            )
        else:
            box = _as_box(it)
            if box is not None:
                out.append({"box": box, "label": "", "complete": None, "raw_mode": "json"})
    if not out and text:
        for m in _QWEN2_BOX.finditer(text):
            out.append(
                {
                    "box": [float(g) for g in m.groups()],
                    "label": "",
                    "complete": None,
                    "raw_mode": "qwen2_norm1000",
                }
            )
    return out


def to_frame_box(
    box: list[float], frame_hw: tuple[int, int], input_hw: tuple[int, int] | None, coords: str = "absolute"
) -> tuple[list[float] | None, str | None]:
    """Map a model box to frame pixels, fix swapped corners, clamp to the frame.

    ``coords``: "absolute" (pixels of the resized model input ``input_hw``, Qwen2.5-VL), "norm1000" (0-1000,
    Qwen2-VL) or "auto" (norm1000 when the box exceeds the input size yet stays within 1000). Returns
    (box, None), (clamped box, "clamped") when part of it lay outside the frame, or (None, reason) with
    reason "outside_frame" / "degenerate"."""
    fh, fw = frame_hw
    x0, y0, x1, y1 = box
    x0, x1 = min(x0, x1), max(x0, x1)
    y0, y1 = min(y0, y1), max(y0, y1)
    if coords == "auto":
        ih, iw = input_hw or (fh, fw)
        over = x1 > iw * 1.02 or y1 > ih * 1.02
        coords = "norm1000" if over and max(x1, y1) <= 1000 else "absolute"
    if coords == "norm1000":
        sx, sy = fw / 1000.0, fh / 1000.0
    else:
        ih, iw = input_hw or (fh, fw)
        sx, sy = fw / float(iw), fh / float(ih)
    x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
    if x1 <= 0 or y1 <= 0 or x0 >= fw or y0 >= fh:
        return None, "outside_frame"
    cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(fw), x1), min(float(fh), y1)
    if cx1 - cx0 < 1 or cy1 - cy0 < 1:
        return None, "degenerate"
    clamped = (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1)
    return [round(cx0, 1), round(cy0, 1), round(cx1, 1), round(cy1, 1)], ("clamped" if clamped else None)


_SIDES = ("left", "top", "right", "bottom")


def touched_sides(box: list[float], frame_hw: tuple[int, int], margin_px: float) -> list[str]:
    fh, fw = frame_hw
    x0, y0, x1, y1 = box
    hits = (x0 <= margin_px, y0 <= margin_px, x1 >= fw - margin_px, y1 >= fh - margin_px)
    return [s for s, h in zip(_SIDES, hits) if h]


def apply_box_rules(
    dets: list[dict],
    frame_hw: tuple[int, int],
    min_area_frac: float = 0.01,
    max_iou: float = 0.7,
    border_margin_px: float = 2.0,
    incomplete_sides: tuple[str, ...] = ("left", "top", "right"),
) -> tuple[list[dict], list[dict]]:
    """Phantom supp. §5 rules on one reference frame's detections ``[{subject, box, score, complete?,
    border_box?}]`` (several subjects): drop ``small`` (area fraction below ``min_area_frac``), ``incomplete``
    (judged incomplete by the model, or ``border_box`` - default the box - touching one of
    ``incomplete_sides``), then ``overlap`` (IoU with another subject's kept box above ``max_iou``: the
    lower-scoring one goes). Returns (kept, rejected) with ``reason`` set on each rejected detection."""
    fh, fw = frame_hw
    kept, rejected = [], []
    for d in dets:
        x0, y0, x1, y1 = d["box"]
        area_frac = (x1 - x0) * (y1 - y0) / float(fh * fw)
        sides = touched_sides(d.get("border_box") or d["box"], frame_hw, border_margin_px)
        if area_frac < min_area_frac:
            rejected.append({**d, "reason": "small"})
        elif d.get("complete") is False or any(s in incomplete_sides for s in sides):
            rejected.append({**d, "reason": "incomplete"})
        else:
            kept.append(d)
    kept.sort(key=lambda d: -float(d.get("score") or 0.0))
    final: list[dict] = []
    for d in kept:
        clash = next(
            (k for k in final if k["subject"] != d["subject"] and box_iou(k["box"], d["box"]) > max_iou), None
        )
        if clash is not None:
            rejected.append({**d, "reason": "overlap", "overlaps_subject": clash["subject"]})
        else:
            final.append(d)
    return final, rejected
