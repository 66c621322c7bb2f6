"""The global phase's publish and resume on the real store: a reader during a re-publish sees exactly the old
or the new result, the published folder is a pointer (a symlink locally) to a result under its hash, and a
SIGKILL in any global step resumes to byte-identical shards."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from curation.global_phase import publish
from curation.shards import iter_tar_samples, list_shards, read_index
from curation.storage import Store
from tests.curation.test_shards import make_rows, write


def _snapshot(shards: Path) -> tuple:
    """What one reader sees: the shards list_shards names (resolved once), each one's sample keys and the
    global hashes in their JSON."""
    out = []
    for path in list_shards(shards):
        keys, hashes = [], set()
        for key, s in iter_tar_samples(path):
            keys.append(key)
            hashes.add(json.loads(s["json"])["global_hash"])
        out.append((os.path.basename(path), tuple(keys), tuple(sorted(hashes))))
    return tuple(out)


def test_a_reader_during_a_republish_sees_exactly_the_old_or_the_new_result(tmp_path):
    rows = make_rows(str(tmp_path))
    a = write(tmp_path, rows, maxcount=2)
    shards = tmp_path / "shards"
    state_a = _snapshot(shards)
    b = write(tmp_path, rows, maxcount=3)
    state_b = _snapshot(shards)
    assert a["global_hash"] != b["global_hash"] and len(state_a) == 6 and len(state_b) == 4
    assert (
        shards.is_symlink()
        and Store(str(tmp_path)).read_json(publish.POINTER)["global_hash"] == b["global_hash"]
    )
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            seen.append(_snapshot(shards))

    th = threading.Thread(target=reader)
    th.start()
    try:
        for i in range(4):  # A, B, A, B: each re-publish keeps the shards (records) and swaps the pointer
            again = write(tmp_path, rows, maxcount=2 if i % 2 == 0 else 3)
            assert again["global_hash"] == (a if i % 2 == 0 else b)["global_hash"]
    finally:
        stop.set()
        th.join()
    assert seen and all(s in (state_a, state_b) for s in seen)
    assert state_a in seen and state_b in seen  # the reader did read across the swaps
    # the published index names this result; the older results beyond the previous one are gone
    assert read_index(shards)["global_hash"] == b["global_hash"]
    assert sorted(p.name for p in (tmp_path / publish.RESULTS).iterdir()) == sorted(
        [a["global_hash"], b["global_hash"]]
    )


def test_a_third_result_drops_the_oldest_and_keeps_the_previous(tmp_path):
    rows = make_rows(str(tmp_path))
    hashes = [write(tmp_path, rows, maxcount=m)["global_hash"] for m in (2, 3, 4)]
    kept = sorted(p.name for p in (tmp_path / publish.RESULTS).iterdir())
    assert kept == sorted(hashes[1:])
    assert Store(str(tmp_path)).read_json(publish.POINTER)["previous"] == hashes[1]
    assert [e["samples"] for e in read_index(tmp_path / "shards")["shards"]] == [4, 4, 4]


# ---------------------------------------------------------------------------------------------------------
# a SIGKILL in every global step: a child runs the global phase on synthetic tables (curation/demo/tables.py)
# and is killed as soon as the step's first output appears; a re-run gives the shards of an uninterrupted run

PAIR = {"low": 0.6, "high": 0.99, "candidates": 8, "method": "faiss"}
WRITE = {"maxcount": 16, "clips_per_partition": 100}
_CHILD = f"""
import sys
from curation.config import StageSpec
from curation.global_phase import run_global
from curation.stage import StageContext
from curation.storage import Store

root = sys.argv[1]
specs = [StageSpec(stage="pair", params={PAIR!r}), StageSpec(stage="write_shards", params={WRITE!r})]
ctx = StageContext(out_dir=root, config_hash="cafe0123")
run_global(specs, Store(root), ctx, "synth", runner="sequential")
"""
# each step by the first file it writes
STEPS = {
    "gather": "global/gen-synth/*/units/*/*/*.parquet",
    "ivf_train": "global/search-*/ivf/*/*/*/centroids.npy",
    "ivf_assign": "global/search-*/ivf/*/*/*/g*/assign/*.json",
    "ivf_search": "global/search-*/ivf/*/*/*/partial/*/*/*.parquet",
    "candidates": "global/pairs-*/raw/*/*/*.parquet",
    "near_duplicates": "global/pairs-*/dedup/long/*/*.parquet",
    "verdicts": "global/pairs-*/pairs/*/*/*.parquet",
    "plans": "global/plans-*/part-*.parquet",
    "shards": "global/results/*/shards/.records/*.json",
    "publish": "global/results/*/shards/.index.json",
}


def _run_global(root: Path) -> dict:
    from curation.config import StageSpec
    from curation.global_phase import run_global
    from curation.stage import StageContext

    specs = [StageSpec(stage="pair", params=PAIR), StageSpec(stage="write_shards", params=WRITE)]
    ctx = StageContext(out_dir=str(root), config_hash="cafe0123")
    return run_global(specs, Store(str(root)), ctx, "synth", runner="sequential")


def _published(root: Path) -> dict:
    shards = root / "shards"
    return {
        "index": (shards / ".index.json").read_bytes(),
        "tars": {p.name: p.read_bytes() for p in sorted(shards.glob("shard-*.tar"))},
    }


@pytest.fixture(scope="module")
def synth_tables(tmp_path_factory):
    """Synthetic committed videos' tables (and their media), and the published result of one uninterrupted
    run over a copy of them."""
    from curation.demo.tables import make_videos

    tables = tmp_path_factory.mktemp("tables")
    make_videos(str(tables), 240, dim=16, clips_per_video=6)
    ref = tmp_path_factory.mktemp("ref") / "run"
    shutil.copytree(tables, ref)
    summary = _run_global(ref)
    assert summary["triplets_out"] > 0 and summary["shards"] > 1
    return tables, _published(ref)


@pytest.mark.parametrize("step", list(STEPS))
def test_a_sigkill_in_every_global_step_resumes_to_identical_output(step, synth_tables, tmp_path):
    tables, want = synth_tables
    root = tmp_path / "run"
    shutil.copytree(tables, root)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(root)], cwd=os.getcwd())
    deadline = time.time() + 300
    try:
        while not glob.glob(str(root / STEPS[step])) and child.poll() is None and time.time() < deadline:
            time.sleep(0.002)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert glob.glob(str(root / STEPS[step])), f"the child never reached {step}"
    killed_before_publish = not (root / publish.POINTER).exists()
    summary = _run_global(root)
    assert _published(root) == want
    assert summary["triplets_out"] == json.loads(want["index"])["total_samples"]
    if step in ("gather", "ivf_train", "ivf_assign", "candidates", "plans"):
        assert killed_before_publish  # killed mid-run, not after the end (so the resume was real)
