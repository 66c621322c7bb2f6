"""Reply parsers and box rules against a corpus of realistic and malformed model replies."""

import pytest

from curation.parsing import (
    RULE_NOUNS,
    apply_box_rules,
    box_iou,
    categorize,
    extract_json,
    head_noun,
    lower_words,
    normalize_category,
    parse_bbox_reply,
    parse_subjects,
    rule_category,
    singular,
    to_frame_box,
)

CAPTION = (
    "A man with short brown hair in a black t-shirt talks on a phone while his golden retriever sits "
    "beside him on a sofa."
)

SUBJECT_REPLIES = [
    # (reply, expected names or None when parsing must fail, error code)
    ('[{"name": "man", "description": "man with short brown hair", "category": "human"}]', ["man"], None),
    (
        'Sure! Here are the subjects:\n```json\n[{"name": "man", "description": "a man in a black t-shirt", '
        '"category": "human"},\n {"name": "golden retriever", "description": "dog", "category": '
        '"animal"},]\n```\n'
        "Let me know if you need more.",
        ["man", "golden retriever"],
        None,
    ),
    (
        "[{'name': 'phone', 'description': 'a phone', 'category': 'product'}, {'name': 'sofa', "
        "'description': "
        "'sofa', 'category': None}]",
        ["phone", "sofa"],
        None,
    ),
    (
        '{"subjects": [{"name": "t-shirt", "description": "black t-shirt", "category": "Clothing"}]}',
        ["t-shirt"],
        None,
    ),
    (
        'The subjects are [{"name": "man", "description": "talking man", "category": "human"}, '
        '{"name": "dog", '
        '"descrip',
        ["man"],
        None,
    ),  # truncated at max_new_tokens
    (
        '[{"name": "man", "description": "x", "category": "human"}, {"name": "man", "description": "y"}]',
        ["man"],
        None,
    ),
    ("[]", None, "no_subjects"),
    ("I cannot find any subjects in this caption.", None, "no_json"),
    ('{"answer": 3}', None, "not_a_list"),
    ('[{"name": "cat", "description": "a cat", "category": "animal"}]', None, "unsupported"),
    ('[{"description": "no name here"}, 42]', None, "no_subjects"),
]


@pytest.mark.parametrize("reply,names,error", SUBJECT_REPLIES)
def test_parse_subjects_corpus(reply, names, error):
    res = parse_subjects(reply, CAPTION)
    assert res.error == error
    assert [s["name"] for s in res.subjects] == (names or [])
    for s in res.subjects:
        assert s["category"] in ("human", "animal", "clothes", "product", "landmark", "ip_character", "other")
        assert s["description"]


def test_categories_unknown_map_to_other():
    assert normalize_category("spaceship") == "other"
    assert normalize_category("IP Character") == "ip_character"
    assert normalize_category("Person") == "human"


def test_llm_category_wins_unless_the_rule_fires():
    # none of these nouns is in the bundled sample (test below)
    reply = (
        '[{"name": "bus", "description": "red bus", "category": "human"}, '  # rule: bus is a product
        '{"name": "gizmo", "description": "thing", "category": "weird"}, '  # not a rule noun: LLM, unknown
        '{"name": "kite", "description": "kite", "category": "animal"}, '  # not a rule noun: the LLM wins
        '{"name": "nurses", "description": "two nurses", "category": "Person"}, '  # agrees: LLM
        '{"name": "cartoon dog", "description": "a cartoon dog", "category": "ip_character"}, '  # exempt
        '{"name": "lighthouse", "description": "lighthouse", "category": ""}]'  # no label: the rule
    )
    res = parse_subjects(reply, "A red bus, a gizmo, a kite, nurses, a cartoon dog and a lighthouse.")
    got = [(s["name"], s["category"], s["category_source"], s.get("category_llm")) for s in res.subjects]
    assert got == [
        ("bus", "product", "rule", "human"),
        ("gizmo", "other", "llm", None),
        ("kite", "animal", "llm", None),
        ("nurses", "human", "llm", None),
        ("cartoon dog", "ip_character", "llm", None),
        ("lighthouse", "landmark", "rule", "other"),
    ]
    raw = parse_subjects(
        '[{"name": "bus", "description": "red bus", "category": "human"}]', category_rule=False
    )
    assert [(s["category"], s["category_source"]) for s in raw.subjects] == [("human", "llm")]
    assert categorize("two golden retrievers", "product") == ("animal", "rule")  # plural folded, head noun
    assert categorize("man in a sweater", "product") == ("product", "llm")  # head noun "man": no rule


def test_rule_nouns_hold_no_noun_of_the_bundled_sample():
    """The rule must not be fitted to the sample: every word of its captions, subject names and
    descriptions, identities and backgrounds is absent from RULE_NOUNS (plurals folded)."""
    from curation.demo import footage as f

    texts = []
    for key, s in f.SUBJECTS.items():
        texts += [key, s.name, s.description, s.verb, s.asset]
    for v in f.REAL_VIDEOS.values():
        texts += v["captions"]
    for key, bg in f.BACKGROUNDS.items():
        texts += [key, bg["phrase"]]
    for key, ident in f.EXTRA_IDENTITIES.items():
        texts += [key, ident["name"], ident["description"]]
    texts += [d for d, _ in f.LFW_FALLBACK.values()]
    descriptions = {k: s.description for k, s in f.SUBJECTS.items()}
    texts += [
        f.caption_for(shot, descriptions) for shots in f.VIDEOS.values() for shot in shots if not shot.copy_of
    ]
    sample_words = {singular(w) for t in texts for w in lower_words(t)}
    assert {"astronaut", "espresso", "saucer", "rocket", "woman", "cat"} <= sample_words  # the texts are read
    rule_words = {singular(w) for words in RULE_NOUNS.values() for w in words.split()}
    assert not rule_words & sample_words
    for word in sorted(sample_words):
        assert rule_category(word) is None, word


def test_head_noun_and_caption_support():
    assert head_noun("man in a grey suit") == "man"
    assert head_noun("the two women") == "women"
    res = parse_subjects(
        '[{"name": "women", "description": "w"}, {"name": "puppies", "description": "p"}]',
        "A woman plays with a puppy.",
    )
    assert [s["name"] for s in res.subjects] == ["women", "puppies"]


def test_extract_json_variants():
    assert extract_json('```\n{"a": [1, 2,],}\n```') == {"a": [1, 2]}
    assert extract_json("prose {'ok': True, 'none': None} more") == {"ok": True, "none": None}
    assert extract_json("The man's box: [1, 2, 3, 4].") == [1, 2, 3, 4]
    assert extract_json("") is None and extract_json(None) is None and extract_json("[unclosed") is None


BBOX_REPLIES = [
    ('```json\n[\n\t{"bbox_2d": [120, 40, 300, 400], "label": "man"}\n]\n```', [120, 40, 300, 400], "json"),
    ('{"bbox_2d": [10, 20, 30, 40], "label": "dog", "complete": false}', [10, 20, 30, 40], "json"),
    ("The box is [5, 6, 50, 60].", [5, 6, 50, 60], "json"),
    ('[{"bbox": {"x1": 1, "y1": 2, "x2": 3, "y2": 4}}]', [1, 2, 3, 4], "json"),
    (
        "<|object_ref_start|>man<|object_ref_end|><|box_start|>(100,200),(500,900)<|box_end|>",
        [100, 200, 500, 900],
        "qwen2_norm1000",
    ),
]


@pytest.mark.parametrize("reply,box,mode", BBOX_REPLIES)
def test_parse_bbox_reply_corpus(reply, box, mode):
    got = parse_bbox_reply(reply)
    assert got and got[0]["box"] == [float(v) for v in box] and got[0]["raw_mode"] == mode


def test_parse_bbox_reply_rejects_garbage():
    assert parse_bbox_reply("[]") == []
    assert parse_bbox_reply("ĠrandomĠtokens }{ ] ,, 12") == []
    assert parse_bbox_reply('[{"bbox_2d": [1, 2, 3]}]') == []  # three numbers are not a box


def test_to_frame_box_mapping():
    frame_hw, input_hw = (144, 176), (140, 168)  # smart_resize(144, 176) with factor 28
    # Absolute coords in the resized input map by the per-axis scale.
    box, note = to_frame_box([84, 70, 168, 140], frame_hw, input_hw, "absolute")
    assert box == [88.0, 72.0, 176.0, 144.0] and note is None
    # Swapped corners are sorted.
    assert to_frame_box([168, 140, 84, 70], frame_hw, input_hw)[0] == [88.0, 72.0, 176.0, 144.0]
    # 0-1000 normalised.
    assert to_frame_box([0, 0, 500, 500], frame_hw, input_hw, "norm1000")[0] == [0.0, 0.0, 88.0, 72.0]
    # auto: coordinates past the input size but within 1000 are read as normalised.
    assert to_frame_box([500, 500, 1000, 1000], frame_hw, input_hw, "auto")[0] == [88.0, 72.0, 176.0, 144.0]
    # Partly outside: clamped and flagged; fully outside: rejected.
    box, note = to_frame_box([-20, 10, 100, 300], frame_hw, input_hw)
    assert box[0] == 0.0 and box[3] == 144.0 and note == "clamped"
    assert to_frame_box([200, 200, 300, 300], frame_hw, input_hw) == (None, "outside_frame")
    assert to_frame_box([10, 10, 10.2, 50], frame_hw, input_hw) == (None, "degenerate")


def test_box_rules():
    hw = (100, 200)
    dets = [
        {"subject": 0, "box": [50, 20, 120, 99], "score": 0.9},  # kept (bottom contact allowed by default)
        {"subject": 1, "box": [52, 21, 121, 99], "score": 0.5},  # overlaps subject 0 -> overlap
        {"subject": 2, "box": [10, 10, 14, 14], "score": 0.9},  # 16 px^2 of 20000 -> small
        {"subject": 3, "box": [0, 30, 40, 80], "score": 0.9},  # touches the left border -> incomplete
        {
            "subject": 4,
            "box": [150, 30, 190, 80],
            "score": 0.9,
            "complete": False,
        },  # model says cut -> incomplete
        {
            "subject": 5,
            "box": [130, 10, 199.5, 90],
            "score": 0.8,
            "border_box": [150, 20, 170, 40],
        },  # face ok
    ]
    kept, rejected = apply_box_rules(dets, hw, min_area_frac=0.01, max_iou=0.7)
    assert sorted(d["subject"] for d in kept) == [0, 5]
    reasons = {d["subject"]: d["reason"] for d in rejected}
    assert reasons == {1: "overlap", 2: "small", 3: "incomplete", 4: "incomplete"}
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    # Bottom truncation counts when configured.
    _, rej = apply_box_rules(dets[:1], hw, incomplete_sides=("bottom",))
    assert rej[0]["reason"] == "incomplete"


def test_escaped_quotes_inside_strings_do_not_close_them():
    from curation.parsing import json_closed

    assert not json_closed('[{"name": "sign", "description": "reads \\"exit]\\" in red"}')
    assert json_closed('[{"name": "sign", "description": "reads \\"exit]\\" in red"}]')


def test_json_scanner_skips_brackets_inside_prose_strings():
    # a scanner that ignored strings would return the quoted [1, 2]
    assert extract_json('He said "[1, 2]" and then [3, 4]') == [3, 4]
    assert extract_json('The sign reads "{exit}", then: {"label": "man"}') == {"label": "man"}
    assert extract_json('It is "the man\'s [box]" and [5, 6, 7, 8]') == [5, 6, 7, 8]


def test_trailing_comma_repair_leaves_string_contents_alone():
    assert extract_json('{"a": "true or null",}') == {"a": "true or null"}
    # a regex over the whole text would turn ", ]" inside the string into "]"
    assert extract_json('{"a": "1, ]", "b": [1, 2,],}') == {"a": "1, ]", "b": [1, 2]}
    assert extract_json('[{"name": "sign \\"x,}\\" red", "n": null,},]') == [
        {"name": 'sign "x,}" red', "n": None}
    ]
    # a JSON-only escape ("\\/"): ast.literal_eval reads it as two characters, so only the trailing-comma
    # repair before json.loads gives the right value
    assert extract_json('{"a": "x\\/y",}') == {"a": "x/y"}
    assert extract_json('prose [{"a": "x\\/y"},] more') == [{"a": "x/y"}]
    # the Python-literal path spells true/null the Python way outside strings only
    assert extract_json("{'a': 'true or null', 'b': true, 'c': [null,],}") == {
        "a": "true or null",
        "b": True,
        "c": [None],
    }
