"""The plan step on the real store: a partition reads its near-duplicate groups from the groups file (its own
videos' rows) and plans byte-identically to the whole map, the partition count follows the clips and the
candidate bytes, and planning in more partitions plans the same samples."""

from __future__ import annotations

import glob
import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.global_phase import plans
from curation.global_phase.pairs import read_groups
from curation.global_phase.tables import BUCKETS
from curation.storage import Store
from tests.curation.test_global_phase import _reupload_rows
from tests.curation.test_shards import write


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """One sequential global run over videos with a re-upload (a near-duplicate group), half of the sources
    held out (the group sets the split); its store, summary, candidate files, clips folder and groups file."""
    root = tmp_path_factory.mktemp("plans")
    summary = write(root, _reupload_rows(root), eval_frac=0.5, seed=3)
    store = Store(str(root))
    pdir = f"global/pairs-{summary['pair_hash']}"
    files = store.read_json(f"{pdir}/_done.json")["files"]
    clips = {os.path.dirname(p) for p in glob.glob(f"{root}/global/**/clips-??.parquet", recursive=True)}
    assert len(clips) == 1
    gdir = os.path.relpath(clips.pop(), root)
    return store, summary, files, gdir, f"{pdir}/dedup/groups.parquet"


def _params(summary: dict, **write) -> dict:
    wp = {
        "seed": 3,
        "eval_frac": 0.5,
        "in_pair": True,
        "cross_pair": True,
        "cross_per_clip": 1,
        "in_pair_keep": 1.0,
        "cross_pair_keep": 1.0,
        "category_weights": {},
        "scenario_weights": {},
        "scenario_quotas": {},
        "face_categories": ["human"],
        "partitions": 0,
        "clips_per_partition": 20000,
        **write,
    }
    return {"write": wp, "config_hash": "cafe0123", "global_hash": summary["global_hash"]}


def _read(store: Store, rel: str) -> pa.Table:
    return pq.read_table(io.BytesIO(store.read_bytes(rel)))


def test_a_partition_reads_its_groups_from_the_groups_file_and_plans_as_with_the_whole_map(planned):
    store, summary, files, gdir, groups = planned
    whole = read_groups(store, groups)
    assert whole == {"v00": "v00", "v03": "v00"}  # the re-upload is one source
    params = _params(summary)
    item = {"lo": 0, "hi": BUCKETS, "n_partitions": 1, "gather": gdir, "pairs": files, "groups": groups}
    a = plans.plan_partition({**item, "out": "t/from-file.parquet"}, store, params)
    b = plans.plan_partition({**item, "out": "t/from-map.parquet"}, store, params, groups=whole)
    assert a == b and a["samples"] > 0
    assert store.read_bytes("t/from-file.parquet") == store.read_bytes("t/from-map.parquet")
    # and the same bytes as the run's own plans (one partition: 30 clips)
    run_plans = f"global/plans-{summary['global_hash']}/part-00000.parquet"
    assert store.read_bytes("t/from-file.parquet") == store.read_bytes(run_plans)
    t = _read(store, "t/from-file.parquet").to_pylist()
    reup = [p for p in t if p["video_id"] in ("v00", "v03")]
    assert reup and {'"source_group": "v00"' in p["meta"] for p in reup} == {True}
    assert len({p["split"] for p in reup}) == 1  # the group goes to one side of the split


def test_partition_count_follows_the_clips_and_the_candidate_bytes():
    wp = {"partitions": 0, "clips_per_partition": 100}
    assert plans.n_partitions(50, 0, wp) == 1
    assert plans.n_partitions(101, 0, wp) == 2
    assert plans.n_partitions(300, 0, wp) == 4  # a power of two
    assert plans.n_partitions(50, 3 * plans.PAIR_BYTES_PER_PARTITION, wp) == 4  # candidates dominate
    assert plans.n_partitions(10**9, 10**15, wp) == BUCKETS  # a partition is at least one bucket
    assert plans.n_partitions(10**9, 0, {**wp, "partitions": 8}) == 8  # set in the YAML


def test_more_partitions_from_the_candidate_bytes_plan_the_same_samples(planned, monkeypatch):
    store, summary, files, gdir, groups = planned
    params = _params(summary)
    n = plans.partitions_for(store, 30, files, params["write"])
    one = plans.plan_items(n, files, gdir, groups, "t/one")
    assert n == 1 and len(one) == 1
    total = sum(store.size(f) for fs in files.values() for f in fs)
    monkeypatch.setattr(plans, "PAIR_BYTES_PER_PARTITION", max(1, total // 5))
    n = plans.partitions_for(store, 30, files, params["write"])
    many = plans.plan_items(n, files, gdir, groups, "t/many")
    assert n == 8 and [it["lo"] for it in many] == [32 * p for p in range(8)]
    for it in one + many:
        plans.plan_partition(it, store, params)
    rows = lambda items: sorted(  # noqa: E731
        (r["key"], r["meta"]) for it in items for r in _read(store, it["out"]).to_pylist()
    )
    assert rows(one) == rows(many) and rows(one)
