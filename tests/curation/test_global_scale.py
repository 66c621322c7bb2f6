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
    monkeypatch.setattr(ivf, "LIST_ROWS", 16)  # several lists in a range
    exact = _run(store, gather, "exact", method="exact")
    sharded = _run(store, gather, "ivf", method="faiss", nprobe=1024)
    assert store.exists(next(iter(store.list("p-ivf/ivf/subject/"))))  # the sharded path ran
    shape = ivf.shape(max(gather["units"].values()), {"nprobe": 1024})
    assert shape["ranges"] > 1 and shape["nlist"] > 1
    assert _pairs(store, exact) == _pairs(store, sharded)
    assert _pairs(store, exact, "face") == _pairs(store, sharded, "face")
    assert exact["verdicts"] == sharded["verdicts"] and exact["verdicts"]["subject"]["pair"] > 0


def test_sharded_search_with_few_probes_keeps_most_in_band_pairs(synth, monkeypatch):
    store, gather = synth
    monkeypatch.setattr(ivf, "LIST_ROWS", 16)
    assert ivf.shape(max(gather["units"].values()), {"nprobe": 2})["nlist"] > 4  # 2 probes: approximate
    exact = {p for p in _pairs(store, _run(store, gather, "exact2", method="exact")) if p[4] == "pair"}
    approx = {
        p for p in _pairs(store, _run(store, gather, "ivf2", method="faiss", nprobe=2)) if p[4] == "pair"
    }
    assert len(approx & exact) >= 0.9 * len(exact)


def _two_level(monkeypatch):
    """Constants that put the synthetic set's large categories on the two-level quantizer."""
    monkeypatch.setattr(ivf, "RANGE_ROWS", 40)
    monkeypatch.setattr(ivf, "BLOCK_ROWS", 50)
    monkeypatch.setattr(ivf, "LIST_ROWS", 16)
    monkeypatch.setattr(ivf, "NLIST_MAX", 2)
    monkeypatch.setattr(ivf, "TWO_LEVEL_LISTS", 2)
    monkeypatch.setattr(ivf, "SUB_LISTS", 2)
    monkeypatch.setattr(ivf, "TRAIN_PER_LIST_MIN", 4)


def test_two_level_quantizer_probing_every_list_equals_the_exact_search(synth, monkeypatch):
    """Above NLIST_MAX lists the quantizer has two levels (first-level cells, each cell's lists trained in its
    own task on its own sample, an HNSW graph over the lists); probing every list still gives the exact
    search's pairs and verdicts."""
    store, gather = synth
    _two_level(monkeypatch)
    sh = ivf.shape(max(gather["units"].values()), {"nprobe": 1024})
    assert sh["cells"] == 2 and sh["nlist"] > ivf.NLIST_MAX
    exact = _run(store, gather, "exact3", method="exact")
    two = _run(store, gather, "ivf3", method="faiss", nprobe=1024)
    trained = [f for f in store.list("p-ivf3/ivf/subject/") if f.endswith("/train.json") and "level" not in f]
    assert trained and all(store.read_json(f).get("cells") for f in trained)
    assert any(store.read_json(f)["nlist"] > ivf.NLIST_MAX for f in trained)
    assert _pairs(store, exact) == _pairs(store, two)
    assert exact["verdicts"] == two["verdicts"]


def test_two_level_quantizer_with_few_probes_keeps_most_in_band_pairs(synth, monkeypatch):
    store, gather = synth
    _two_level(monkeypatch)
    exact = {p for p in _pairs(store, _run(store, gather, "exact4", method="exact")) if p[4] == "pair"}
    approx = {
        p for p in _pairs(store, _run(store, gather, "ivf4", method="faiss", nprobe=3)) if p[4] == "pair"
    }
    trained = [f for f in store.list("p-ivf4/ivf/subject/") if f.endswith("/train.json") and "level" not in f]
    assert max(store.read_json(f)["nlist"] for f in trained) > 3 * 2  # 3 probes of more lists: approximate
    assert len(approx & exact) >= 0.9 * len(exact)


def test_the_hnsw_graph_finds_the_nearest_lists():
    """The two-level quantizer's HNSW graph over the list centroids: the same first list as scoring every
    centroid for nearly every unit, most of the exact nearest lists, nearest first; the same bytes when
    built twice."""
    from curation.global_phase import quantizer

    rng = np.random.default_rng(0)
    lists = quantizer.kmeans(rng.standard_normal((4000, 64)).astype(np.float32), 400)
    x = rng.standard_normal((2000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    graph = quantizer.hnsw(lists)
    assert graph == quantizer.hnsw(lists)
    got, want = quantizer.nearest_hnsw(x, graph, 16), quantizer.nearest(x, lists, 16)
    assert (got[:, 0] == want[:, 0]).mean() >= 0.99
    assert np.mean([len(set(g) & set(w)) / 16 for g, w in zip(got, want)]) >= 0.95
    s = np.take_along_axis(x @ lists.T, got, 1)
    assert (np.diff(s, axis=1) <= 1e-6).all()  # nearest first


def test_one_rescoring_of_merged_lists_gives_each_lists_top_m():
    """A range's lists merged before the float64 rescoring (``near_top``) give the same top m, row for row,
    as rescoring each list's top m; on coarse vectors with many tied fp32 scores and same-source hits."""
    rng = np.random.default_rng(3)
    d, per, n_lists, n_q, m = 16, 40, 5, 60, 4
    nx = per * n_lists
    x = rng.integers(-1, 2, (nx, d)).astype(np.float32) + 1e-3 * rng.standard_normal((nx, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = x[rng.integers(0, len(x), n_q)] + np.float32(0.05) * rng.standard_normal((n_q, d)).astype(np.float32)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    cgroup, qgroup = rng.integers(0, 30, len(x)), rng.integers(0, 30, n_q)
    cuid = rng.permutation(len(x)).astype(np.int64)
    probe = np.stack([rng.choice(n_lists, 3, replace=False) for _ in range(n_q)])
    out = {}
    for merged in (False, True):
        got = [[], [], []]
        for lst in range(n_lists):
            qs = np.nonzero((probe == lst).any(1))[0]
            a, e = lst * per, (lst + 1) * per
            qi, ci, sc = ivf.top_m(q[qs], x[a:e], qgroup[qs], cgroup[a:e], cuid[a:e], m, rescore=not merged)
            for acc, v in zip(got, (qs[qi], ci + a, sc)):
                acc.append(v)
        qi, ci, sc = (np.concatenate(v) for v in got)
        if merged:
            keep = ivf.near_top(qi, sc, m)
            assert len(keep) < len(qi)  # the merge does leave candidates out
            qi, ci = qi[keep], ci[keep]
            sc = ivf.exact_scores(q, x, qi, ci)
        sel = ivf._top_per_query(qi, -sc, cuid[ci], m)
        out[merged] = (qi[sel], ci[sel], sc[sel])
    assert len(out[False][0]) == n_q * m
    for a, b in zip(out[False], out[True]):
        assert np.array_equal(a, b)


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


# ---------------------------------------------------------------------------------------------------------
# near-duplicate grouping: connected components by min-label propagation over partitioned edges


def _copy_edges(pairs: list[tuple[str, str]], clips: int = 2) -> list[dict]:
    """Copy edges covering every clip of both videos of each pair (so every pair qualifies)."""
    return [
        {
            "q_video": a,
            "q_clip": f"{a}-{i}",
            "c_video": b,
            "c_clip": f"{b}-{i}",
            "q_v_n_clips": clips,
            "c_v_n_clips": clips,
        }
        for a, b in pairs
        for i in range(clips)
    ]


def _components(tmp_path, edges: list[dict], runner="sequential", blocks=3, min_frac=0.5) -> dict:
    import pyarrow as pa

    from curation.global_phase import components
    from curation.global_phase.pairs import read_groups
    from curation.global_phase.tables import write_parquet

    store = Store(str(tmp_path))
    files = []
    for i in range(blocks):  # the edges spread over several search blocks
        rel = f"copies/block-{i}.parquet"
        write_parquet(
            store, rel, pa.Table.from_pylist(edges[i::blocks]) if edges[i::blocks] else pa.table({})
        )
        files.append(rel)
    old = components.EDGE_BYTES_PER_PARTITION
    components.EDGE_BYTES_PER_PARTITION = 1500  # several partitions even for a few edges
    try:
        res = components.near_duplicate_groups(
            store, files, "dedup", "dedup/groups.parquet", {"near_dup_min_frac": min_frac}, runner
        )
    finally:
        components.EDGE_BYTES_PER_PARTITION = old
    groups = read_groups(store, "dedup/groups.parquet")
    assert res["near_duplicate_videos"] == len(groups)
    assert res["near_duplicate_groups"] == len(set(groups.values()))
    return groups


def _reference(edges: list[dict], min_frac=0.5) -> dict:
    from curation.global_phase.pairs import near_duplicate_groups

    cols = ("q_video", "q_clip", "c_video", "c_clip", "q_v_n_clips", "c_v_n_clips")
    return near_duplicate_groups([tuple(e[c] for c in cols) for e in edges], min_frac)


def test_components_of_a_chain_a_star_and_a_cycle(tmp_path):
    chain = [(f"c{i:02d}", f"c{i + 1:02d}") for i in range(12)]  # 13 videos, diameter 12
    star = [("s00", f"s{i:02d}") for i in range(1, 9)]
    cycle = [(f"y{i}", f"y{(i + 1) % 6}") for i in range(6)]
    edges = _copy_edges(list(reversed(chain)) + star + cycle)
    got = _components(tmp_path, edges)
    assert got == _reference(edges)
    assert {v for v, g in got.items() if g == "c00"} == {f"c{i:02d}" for i in range(13)}
    assert {v for v, g in got.items() if g == "s00"} == {f"s{i:02d}" for i in range(9)}
    assert {v for v, g in got.items() if g == "y0"} == {f"y{i}" for i in range(6)}
    assert len(set(got.values())) == 3


def test_components_keep_only_pairs_that_cover_enough_clips(tmp_path):
    """v1-v2 share 1 of 4 clips (not a re-upload); v3-v4 share all: only v3/v4 group; random graphs match
    the in-memory reference."""
    edges = _copy_edges([("v1", "v2")], clips=1)
    for e in edges:
        e["q_v_n_clips"] = e["c_v_n_clips"] = 4
    edges += _copy_edges([("v3", "v4")])
    assert _components(tmp_path / "a", edges) == {"v3": "v3", "v4": "v3"}
    rng = np.random.default_rng(0)
    pairs = [(f"r{a:03d}", f"r{b:03d}") for a, b in rng.integers(0, 120, (90, 2)) if a != b]
    edges = _copy_edges(pairs)
    assert _components(tmp_path / "b", edges) == _reference(edges)


def test_components_on_ray_match_the_sequential_runner(tmp_path):
    import ray

    edges = _copy_edges([(f"c{i}", f"c{i + 1}") for i in range(5)] + [("x1", "x2")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        assert _components(tmp_path, edges, runner="ray") == _reference(edges)
    finally:
        ray.shutdown()


def test_the_training_sample_is_capped_whatever_the_category_size():
    """TRAIN_PER_LIST points a list up to TRAIN_MAX: a 150M-unit category trains its first level on TRAIN_MAX
    points, not on 256 x 146k x 768 floats in one task; its lists still hold ~LIST_ROWS units."""
    pp = {"nprobe": 16}
    assert ivf.shape(100_000, pp)["train_n"] == ivf.TRAIN_PER_LIST * ivf.shape(100_000, pp)["nlist"]
    at_cap = ivf.shape(ivf.NLIST_MAX * ivf.LIST_ROWS, pp)  # the largest one-level quantizer
    assert at_cap["nlist"] == ivf.NLIST_MAX and at_cap["train_n"] == ivf.TRAIN_MAX and "cells" not in at_cap
    assert at_cap["train_n"] // at_cap["nlist"] >= ivf.TRAIN_PER_LIST_MIN >= 39  # what faiss asks for a list
    big = ivf.shape(150_000_000, pp)  # two levels: lists stay ~LIST_ROWS units, the first level is capped
    assert big["nlist"] == 146_485 and big["cells"] == 2_289 and big["train_n"] == ivf.TRAIN_MAX
    assert ivf.shape(1_000_000, pp)["nlist"] == 977 and ivf.shape(100_000, pp)["nlist"] == 98
    assert ivf.shape(50, pp)["train_n"] == 50  # never more than the units


def test_gather_streams_a_bucket_into_row_groups_of_many_videos(s3_bucket, monkeypatch):
    """A bucket of 40 videos on a real S3 API (moto), gathered with ``ROW_GROUP_ROWS`` at 16: the units file
    holds every video's units in listing order, written as row groups of about 16 rows (not one per video,
    not the whole bucket at once), the clips file every clip, and the counts and digest match."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.global_phase import gather
    from curation.global_phase.tables import bucket_of, clip_schema, unit_schema, write_parquet

    monkeypatch.setattr(gather, "ROW_GROUP_ROWS", 16)
    store = Store(s3_bucket + "/run")
    vids = [v for v in (f"v{i:05d}" for i in range(20000)) if bucket_of(v) == 7][:40]
    want = []
    rng = np.random.default_rng(0)
    for v in vids:
        units = pa.table({
            "kind": ["subject"] * 3, "bucket": [7] * 3, "video_id": [v] * 3,
            "clip_id": [f"{v}-{i:04d}" for i in range(3)], "subject": [0, 1, 2], "category": ["animal"] * 3,
            "vector": [list(rng.standard_normal(4).astype(np.float32)) for _ in range(3)],
            "phashes": [[1, 2]] * 3, "crop_path": ["c.jpg"] * 3, "crop_box": [[0, 0, 8, 8]] * 3,
            "crop_box_tight": [[0, 0, 8, 8]] * 3, "crop_ref": [0] * 3, "ref_t_s": [0.0] * 3,
            "ref_frame_index": [0] * 3, "v_n_clips": [3] * 3,
        }, schema=unit_schema())
        clips = pa.Table.from_pylist(
            [{"video_id": v, "clip_id": f"{v}-{i:04d}", "bucket": 7, "row": "{}"} for i in range(3)],
            schema=clip_schema(),
        )
        write_parquet(store, f"tables/m/units/07/{v}.parquet", units)
        write_parquet(store, f"tables/m/clips/07/{v}.parquet", clips)
        want.append(units)
    got = gather.gather_tables(store, "m", "g", "sequential")
    assert got["units"] == {"subject\tanimal": 120} and got["clips"] == 120 and got["videos"] == 40
    f = pq.ParquetFile(store.open_input(gather.unit_file("g", "subject", "animal", 7)))
    assert f.read().to_pylist() == pa.concat_tables(want).to_pylist()  # listing order = video id order
    sizes = [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)]
    assert sizes == [18] * 6 + [12], sizes
    again = gather.gather_tables(store, "m", "g2", "sequential")
    assert again["digest"] == got["digest"]
