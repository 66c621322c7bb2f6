"""The source read by Ray (``curation.ingest``): a Panda CSV cut into byte ranges gives the rows of one pass;
the Parquet parts are keyed by the CSV's digest, so a SIGKILLed driver's finished parts are not redone; a
missing video is found per row without listing the videos folder (counted at a real moto S3 server);
duplicate ids are refused; rows in = rows out with Panda's labels kept. Real local Ray throughout."""

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from curation.sources.panda70m import (
    PandaCsvSource,
    _rows,
    csv_store,
    format_time,
    index_csv,
    parse_cells,
    parse_csv_range,
    read_panda_csv,
)
from curation.storage import Store

REPO = Path(__file__).resolve().parents[2]
HEADER7 = ["videoID", "url", "timestamp", "caption", "matching_score", "desirable_filtering",
           "shot_boundary_detection"]
LABELS = ["desirable", "desirable", "desirable", "1_still_foreground_image", "4_computer_screen_recording"]


def panda_rows(n: int, seed: int = 0, dups: int = 0, bad: bool = True):
    """``n`` rows in the training CSV's 7-column format, 1-20 spans each, Panda's label mix; ``dups`` ids
    repeated further down (with other spans); a few malformed rows when ``bad``."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(1, 20)
        stamps = [[format_time(j * 8.0), format_time(j * 8.0 + 6.0)] for j in range(k)]
        shots = [[[format_time(0.0), format_time(2.5)], [format_time(2.5), format_time(6.0)]]] * k
        rows.append([f"v{i:07d}", f"https://www.youtube.com/watch?v=v{i:07d}", repr(stamps),
                     repr([f"clip {j}, \"quoted\"\nline 2" if j == 0 else f"clip {j}" for j in range(k)]),
                     repr([0.3] * k), repr(rng.choices(LABELS, k=k)), repr(shots)])
    for d in range(dups):
        vid = f"v{d * 7:07d}"
        rows.append([vid, "u", repr([[format_time(500.0), format_time(506.0)]]), "['late']", "[0.2]",
                     "['desirable']", ""])
    if bad:
        rows.insert(3, ["../etc/passwd", "u", "[]", "[]", "[]", "", ""])
        rows.insert(5, ["short", "row"])
        rows.insert(9, ["badtime", "u", "[['0:00:09.000', '0:00:01.000']]", "['x']", "[0.1]", "", ""])
    return rows


def write_csv(path: Path, rows, newline: str = "\n", bom: bool = False) -> str:
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator=newline)
    w.writerow(HEADER7)
    for r in rows:
        w.writerow(r)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buf.getvalue().encode())
    return str(path)


def make_videos(root: Path, ids) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for vid in ids:
        (root / f"{vid}.mp4").write_bytes(b"x")
    return str(root)


@pytest.mark.parametrize("newline,bom", [("\n", False), ("\r\n", True), ("\r", False)])
def test_byte_ranges_give_the_rows_of_one_pass(tmp_path, newline, bom):
    """Cut at record ends (captions hold quoted newlines), every range read alone: the same records, with
    the same line numbers, as one pass over the file; a CSV of bare-CR lines stays one range."""
    p = write_csv(tmp_path / "p.csv", panda_rows(300, dups=3), newline, bom)
    size = os.path.getsize(p)
    with open(p, "rb") as f:
        index = index_csv(f, size, rows_per_part=37)
    assert index["header"] == HEADER7 and index["rows"] == 306
    spans = index["parts"]
    assert spans[0][0] == (0 if newline == "\r" else len(",".join(HEADER7)) + len(newline) + 3 * bom)
    assert spans[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous
    assert len(spans) == (1 if newline == "\r" else 9)
    with open(p, "rb") as f:
        got = [r for a, b, n in spans for r in parse_csv_range(f, HEADER7, a, b, n, "panda70m")]
    want = [bad if bad is not None else parse_cells(row, line, "panda70m")
            for line, row, bad in _rows(p, HEADER7, "panda70m")]
    assert got == want
    assert {r["reason"] for r in got if r["status"] != "ok"} == {"bad_video_id", "malformed_row",
                                                                  "bad_timestamp"}
    # a small CSV is cut at every record: each video its own Ray task
    small = write_csv(tmp_path / "s.csv", panda_rows(5, bad=False))
    with open(small, "rb") as f:
        assert len(index_csv(f, os.path.getsize(small), rows_per_part=1000)["parts"]) == 5


def _records(ds) -> dict:
    return {r["video_id"]: json.loads(r["rec"]) for r in ds.take_all()}


@pytest.fixture
def ray_local():
    import ray

    from curation.execute import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray()
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_ingest_gives_the_sequential_records_rows_in_equal_rows_out(tmp_path, ray_local):
    """300 rows (+ 4 duplicates merged in Ray, 3 bad rows) over 9 parts: the records the sequential reader
    gives, labels and shot boundaries kept per span, the label prefilter applied; a second call reuses
    every part; and the Ray runner commits the same records and counts as the sequential one."""
    from curation.config import Config, RunConfig, SourceSpec
    from curation.ingest import ensure_csv_parts, panda_dataset
    from curation.runner import run_pipeline
    from curation.sources import load_source
    from curation.stage import StageContext

    rows = panda_rows(300, dups=4)
    p = write_csv(tmp_path / "p.csv", rows)
    videos = make_videos(tmp_path / "videos", [f"v{i:07d}" for i in range(0, 300, 2)])  # half are missing
    store = Store(tmp_path / "out")
    src = PandaCsvSource(p, videos, "panda70m", ("desirable",))
    parts = ensure_csv_parts(src, store, rows_per_part=37)
    assert (parts.rows, len(parts.paths), parts.written, parts.reused, parts.dup_ids) == (307, 9, 9, 0, 4)
    got = _records(panda_dataset(src, parts, store))
    want = {r["video_id"]: r for r in read_panda_csv(p, videos, keep_labels=["desirable"])}
    assert got == want
    assert len(got) == 303  # 300 ids + 3 bad rows; the 4 duplicate rows merged into their ids
    assert any(w.startswith("merged_duplicate_row:") for w in got["v0000007"]["warnings"])
    reasons = {r["reason"] for r in got.values() if r["status"] != "ok"}
    assert {"missing_video", "bad_video_id", "malformed_row", "bad_timestamp"} <= reasons
    ok = [r for r in got.values() if r["status"] == "ok" and not r["warnings"]]  # (merged rows lose shots)
    assert ok and all(len(r["span_labels"]) == len(r["spans"]) == len(r["span_shot_boundaries"])
                      and set(r["span_labels"]) == {"desirable"} for r in ok)
    n_skipped = sum(len(r.get("skipped_spans") or ()) for r in got.values())
    assert n_skipped > 0
    again = ensure_csv_parts(src, store, rows_per_part=37)
    assert (again.written, again.reused, again.dup_ids) == (0, 9, 4)

    spec = SourceSpec(kind="panda70m", csv=p, videos_dir=videos)
    cfg = Config(sources={"panda70m": spec}, pipelines={"none": []}, default_source="panda70m",
                 default_pipeline="none", run=RunConfig(source_part_rows=37))
    res = {}
    for runner in ("sequential", "ray"):
        out = str(tmp_path / f"run-{runner}")
        res[runner] = run_pipeline(cfg, "none", load_source(spec, out), StageContext(out_dir=out),
                                   runner=runner)
    seq, par = res["sequential"], res["ray"]
    assert par.source["parts_written"] == 9 and par.videos_in == seq.videos_in == 303
    assert par.totals == seq.totals and par.totals["spans_skipped"] == n_skipped
    assert par.rows == seq.rows
    assert not list(Path(tmp_path / "run-ray").glob("source/run-*"))


def _block_sizes(ds) -> list[int]:
    """The rows of each block of ``ds`` (a task per block: ``batch_size=None``), counted in the workers."""
    import pandas as pd

    def rows(batch):
        return pd.DataFrame({"n": [len(batch)]})

    return [r["n"] for r in ds.map_batches(rows, batch_size=None, batch_format="pandas").take_all()]


def test_a_part_per_read_task_and_blocks_of_videos_per_block(tmp_path, ray_local):
    """Ray Data 2.60's Parquet reader packs small files into one read task up to 128 MB: 9 parts came back
    as 1 block, so one group task got every video and a reader held many parts. ``read_parts`` reads a part
    per task, and the source reaches the map phase in blocks of ``videos_per_block`` videos, with the same
    records; a source of fewer than 256 rows gets a video per block."""
    from curation.ingest import SourceParts, block_rows, ensure_csv_parts, panda_dataset, read_parts

    rows = panda_rows(300, dups=4)
    p = write_csv(tmp_path / "p.csv", rows)
    videos = make_videos(tmp_path / "videos", [f"v{i:07d}" for i in range(0, 300, 3)])
    store = Store(tmp_path / "out")
    src = PandaCsvSource(p, videos, "panda70m", ("desirable",))
    parts = ensure_csv_parts(src, store, rows_per_part=37)
    sizes = sorted(_block_sizes(read_parts(parts.paths, store)))
    assert len(sizes) == len(parts.paths) == 9 and sum(sizes) == 307 and max(sizes) <= 37, sizes
    blocks = _block_sizes(panda_dataset(src, parts, store, rows_per_block=16))
    assert sum(blocks) == 303 and max(blocks) <= 16 and len(blocks) >= 303 // 16, blocks
    after = _block_sizes(panda_dataset(src, parts, store, rows_per_block=16).map_batches(
        lambda b: b, batch_size=1, batch_format="pandas"))  # as the runner's first map (_resume_task)
    assert sum(after) == 303 and max(after) <= 16, after
    assert _records(panda_dataset(src, parts, store, rows_per_block=16)) == _records(
        panda_dataset(src, parts, store))
    assert block_rows(parts, 64) == 64 and block_rows(SourceParts([], rows=255), 64) == 1
    assert block_rows(parts, 16, max_blocks=10) == 31  # 307 rows in at most 10 blocks
    assert block_rows(SourceParts([], rows=3_800_000), 64, max_blocks=4096) == 928


_KILL_DRIVER = """
import sys
from curation.execute import init_ray
from curation.config import RayConfig
from curation.ingest import ensure_csv_parts
from curation.sources.panda70m import PandaCsvSource
from curation.storage import Store
init_ray(RayConfig(num_cpus=1))
ensure_csv_parts(PandaCsvSource(sys.argv[1], sys.argv[2], "panda70m", ("desirable",)), Store(sys.argv[3]),
                 int(sys.argv[4]))
print("DONE", flush=True)
"""


@pytest.mark.slow
def test_driver_killed_while_splitting_restarts_without_redoing_parts(tmp_path):
    """SIGKILL of the driver once some parts are done: the rerun writes only the parts that were not done,
    leaves the finished ones untouched, and the parts equal those of an uninterrupted split."""
    import ray

    from curation.execute import init_ray
    from curation.ingest import ensure_csv_parts

    p = write_csv(tmp_path / "p.csv", panda_rows(6000, bad=False))
    videos = make_videos(tmp_path / "videos", [])
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_DRIVER, p, videos, str(out), "100"], cwd=str(REPO),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(list(out.rglob("*.done.json"))) < 4:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # the killed driver's Ray workers exit on their own
    done = {d: d.stat().st_mtime_ns for d in out.rglob("part-*.done.json")}
    (index,) = out.rglob("index.json")
    total = len(json.loads(index.read_text())["parts"])
    assert total == 60 and 4 <= len(done) < total, (len(done), total)

    if ray.is_initialized():
        ray.shutdown()
    init_ray()
    try:
        src = PandaCsvSource(p, videos, "panda70m", ("desirable",))
        res = ensure_csv_parts(src, Store(out), 100)
        ensure_csv_parts(src, Store(tmp_path / "ref"), 100)
    finally:
        ray.shutdown()
    assert res.written == total - len(done) and res.reused == len(done)
    assert all(d.stat().st_mtime_ns == t for d, t in done.items())  # finished parts not redone
    assert len(list(out.rglob("part-*.done.json"))) == total
    for rel in res.paths:  # the same parts as an uninterrupted split
        assert (out / rel).read_bytes() == (tmp_path / "ref" / rel).read_bytes()
    assert not [q for q in out.rglob("*") if ".tmp" in q.name or q.name.startswith("run-")]


class CountingMotoServer:
    """moto's S3 server (its own WSGI app, on loopback) with every request's method, path and query kept."""

    def __init__(self):
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self.requests: list[tuple[str, str, str]] = []

        def counting(environ, start_response):
            self.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                                  environ.get("QUERY_STRING", "")))
            return app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, counting, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def lists(self, bucket: str) -> list:
        """ListObjects(V2) calls: a GET on the bucket itself (any query), or a ``list-type`` query."""
        return [r for r in self.requests
                if r[0] == "GET" and (r[1].strip("/") == bucket or "list-type" in r[2])]

    def stop(self):
        self.server.shutdown()


@pytest.mark.slow
def test_missing_video_is_found_per_row_without_listing_the_videos_bucket(tmp_path, monkeypatch):
    """Videos on a real S3 API (moto's server, counted at the server): the Ray ingest records a missing
    video ``missing_video`` and finds the present ones with per-row HEADs, and no ListObjects is ever
    sent (the sequential reader neither)."""
    import boto3
    import ray

    from curation.execute import init_ray
    from curation.ingest import ensure_csv_parts, panda_dataset

    srv = CountingMotoServer()
    for k, v in {"AWS_ENDPOINT_URL": srv.url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    s3 = boto3.client("s3", endpoint_url=srv.url, region_name="us-east-1")
    s3.create_bucket(Bucket="vids")
    for vid in ("v0000000", "v0000002"):
        s3.put_object(Bucket="vids", Key=f"videos/{vid}.mp4", Body=b"video")
    s3.put_object(Bucket="vids", Key="videos/_download/log/zz/other.json", Body=b"{}")
    p = write_csv(tmp_path / "p.csv", panda_rows(4, bad=False))
    videos = "s3://vids/videos"
    if ray.is_initialized():
        ray.shutdown()
    init_ray()  # the workers get this test's S3 endpoint
    try:
        srv.requests.clear()
        src = PandaCsvSource(p, videos, "panda70m", ())
        store = Store(tmp_path / "out")
        got = _records(panda_dataset(src, ensure_csv_parts(src, store, 100), store))
    finally:
        ray.shutdown()
    assert {v: r["reason"] for v, r in got.items()} == {"v0000000": None, "v0000001": "missing_video",
                                                         "v0000002": None, "v0000003": "missing_video"}
    assert got["v0000000"]["video_path"] == "s3://vids/videos/v0000000.mp4"
    assert sum(r[0] == "HEAD" for r in srv.requests) >= 4  # the requests were counted: HEADs per row
    assert srv.lists("vids") == []
    srv.requests.clear()
    seq = {r["video_id"]: r for r in read_panda_csv(p, videos)}
    assert seq == got and srv.lists("vids") == []
    srv.stop()


@pytest.mark.slow
def test_duplicate_ids_are_refused_on_ray_and_leave_no_parts(tmp_path, ray_local):
    from curation.config import Config
    from curation.runner import run_pipeline
    from curation.stage import StageContext

    rows = [{"video_id": f"v{i}", "status": "rejected", "reason": "missing_video"} for i in range(5)]
    cfg = Config(sources={}, pipelines={"none": []}, default_pipeline="none")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="duplicate video_id 'v2'"):
        run_pipeline(cfg, "none", iter(rows + [rows[2]]), StageContext(out_dir=str(out)), runner="ray")
    assert not list(out.rglob("*.parquet"))
    res = run_pipeline(cfg, "none", iter(rows), StageContext(out_dir=str(out)), runner="ray")
    assert res.videos_in == 5 and res.videos_committed == 5 and res.source["parts_written"] == 5
    assert not list(out.rglob("*.parquet")) and not list(out.glob("source/run-*"))


def test_csv_digest_follows_the_file(tmp_path):
    from curation.ingest import csv_digest

    p = write_csv(tmp_path / "p.csv", panda_rows(3, bad=False))
    a = csv_digest(PandaCsvSource(p, "", "panda70m"))
    assert a == csv_digest(PandaCsvSource(p, "", "panda70m"))
    assert a != csv_digest(PandaCsvSource(p, "", "sample"))
    with open(p, "a") as f:
        f.write("v9,u,\"[['0:00:00.000', '0:00:01.000']]\",['c'],[0.1],,\n")
    assert a != csv_digest(PandaCsvSource(p, "", "panda70m"))
    assert csv_store(p)[1] == "p.csv"
