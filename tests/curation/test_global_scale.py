"""The global phase's scale paths on the real store, real faiss and (once) a real local Ray: the sharded IVF
search against the exact one, same-source exclusion without asking for more neighbours, and the distributed
near-duplicate grouping on chains, stars and cycles."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.dataset as pds
import pytest

from curation.demo.tables import make_videos
from curation.global_phase import PairParams, ivf
from curation.global_phase.gather import gather_tables
from curation.global_phase.pairs import find_pairs
from curation.storage import Store


def _pairs(store: Store, done: dict, kind: str = "subject") -> set:
    files = [store.path(f) for f in done["files"][kind]]
    t = pds.dataset(files, format="parquet").to_table()
    return set(
        zip(
            t.column("q_clip").to_pylist(),
            t.column("q_subject").to_pylist(),
            t.column("c_clip").to_pylist(),
            t.column("c_subject").to_pylist(),
            t.column("verdict").to_pylist(),
        )
    )


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_videos(str(root), 600, dim=32, clips_per_video=6)
    store = Store(str(root))
    return store, gather_tables(store, "synth", "g", "sequential")


def _run(store, gather, tag, **kw):
    pp = dataclasses.asdict(PairParams(low=0.6, high=0.99, candidates=8, **kw))
    return find_pairs(store, gather, pp, f"p-{tag}", "sequential")


def test_sharded_search_probing_every_list_equals_the_exact_search(synth, monkeypatch):
    """With nprobe = nlist every list range is searched: the same candidates, scores and verdicts as the exact
    blocked search, over several list ranges and query blocks (so the merge across ranges is exercised)."""
    store, gather = synth
    monkeypatch.setattr(ivf, "RANGE_ROWS", 40)
    monkeypatch.setattr(ivf, "BLOCK_ROWS", 50)
    exact = _run(store, gather, "exact", method="exact")
    sharded = _run(store, gather, "ivf", method="faiss", nprobe=1024)
    assert store.exists(next(iter(store.list("p-ivf/ivf/subject/"))))  # the sharded path ran
    shape = ivf.shape(max(gather["units"].values()), {"nprobe": 1024})
    assert shape["ranges"] > 1 and shape["nlist"] > 1
    assert _pairs(store, exact) == _pairs(store, sharded)
    assert _pairs(store, exact, "face") == _pairs(store, sharded, "face")
    assert exact["verdicts"] == sharded["verdicts"] and exact["verdicts"]["subject"]["pair"] > 0


def test_sharded_search_with_few_probes_keeps_most_in_band_pairs(synth):
    store, gather = synth
    exact = {p for p in _pairs(store, _run(store, gather, "exact2", method="exact")) if p[4] == "pair"}
    approx = {p for p in _pairs(store, _run(store, gather, "ivf2", method="faiss", nprobe=2)) if p[4] == "pair"}
    assert len(approx & exact) >= 0.9 * len(exact)


def test_same_source_hits_are_filtered_by_id_not_by_asking_for_more(tmp_path, monkeypatch):
    """Video A has 40 units of one identity, video B one unit of it: B's unit is the only candidate of A's
    units from another source, and every partial result holds at most ``candidates`` rows per query (the old
    faiss path asked for candidates + the largest video's unit count)."""
    import pyarrow as pa

    from curation.global_phase.tables import unit_schema

    rng = np.random.default_rng(0)
    base = rng.standard_normal(16).astype(np.float32)
    rows = []
    for v, n in (("A", 40), ("B", 1), ("C", 30), ("D", 30)):
        for i in range(n):
            x = base + (0.05 if v in "AB" else 3.0) * rng.standard_normal(16).astype(np.float32)
            rows.append(
                {
                    "kind": "subject",
                    "bucket": 0,
                    "video_id": v,
                    "clip_id": f"{v}-{i:03d}",
                    "subject": 0,
                    "category": "cat",
                    "vector": (x / np.linalg.norm(x)).tolist(),
                    "phashes": [],
                    "crop_path": "c.jpg",
                    "crop_box": [0, 0, 1, 1],
                    "crop_box_tight": [0, 0, 1, 1],
                    "crop_ref": 0,
                    "ref_t_s": 0.0,
                    "ref_frame_index": 0,
                    "v_n_clips": n,
                }
            )
    store = Store(str(tmp_path))
    from curation.global_phase.tables import write_parquet

    write_parquet(store, "tables/m/units/00/all.parquet", pa.Table.from_pylist(rows, schema=unit_schema()))
    gather = gather_tables(store, "m", "g", "sequential")
    monkeypatch.setattr(ivf, "RANGE_ROWS", 30)
    pp = dataclasses.asdict(PairParams(low=0.9, high=1.0, candidates=4, method="faiss", nprobe=1024))
    done = find_pairs(store, gather, pp, "p", "sequential")
    got = _pairs(store, done)
    a_pairs = {(q, c) for q, _, c, _, v in got if q.startswith("A-") and v == "pair"}
    assert {c for _, c in a_pairs} == {"B-000"} and len(a_pairs) == 40
    assert not any(q[0] == c[0] for q, _, c, _, _ in got)  # never the same video
    for rel in store.list("p/ivf/", ".parquet"):
        if "/partial/" in rel:
            t = pds.dataset(store.path(rel), format="parquet").to_table()
            counts = np.unique(t.column("qid").to_numpy(), return_counts=True)[1]
            assert counts.max(initial=0) <= 4
