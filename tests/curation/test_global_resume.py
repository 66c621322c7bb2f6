"""The global phase's publish and resume on the real store: a reader during a re-publish sees exactly the old
or the new result, and the published folder is a pointer (a symlink locally) to a result under its hash."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

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
