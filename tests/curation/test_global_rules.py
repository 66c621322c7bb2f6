"""Global-phase rules at their edges: near-duplicate grouping at exactly ``near_dup_min_frac``, the
held-out split's size at a small ``eval_frac``, scenario quotas split across plan partitions, and the
category / scenario keep weights; on hand-built copy edges and small synthetic committed videos."""

from __future__ import annotations

import io
import json
import math

import pytest

from curation.config import StageSpec
from curation.demo.tables import make_videos
from curation.global_phase import run_global, split_of
from curation.global_phase.components import near_duplicate_groups as dist_groups
from curation.global_phase.pairs import near_duplicate_groups as ref_groups
from curation.global_phase.pairs import read_groups
from curation.global_phase.tables import write_parquet
from curation.stage import StageContext
from curation.storage import Store

# ---------------------------------------------------------------------------------------------------------
# near-duplicate grouping: a pair of videos whose copy edges cover exactly min_frac of each is one source


def _edges(a: str, b: str, shared: int, n_a: int, n_b: int) -> list[dict]:
    """Copy edges between ``shared`` clips of video a (of ``n_a``) and of video b (of ``n_b``)."""
    return [
        {
            "q_video": a,
            "q_clip": f"{a}-{i}",
            "c_video": b,
            "c_clip": f"{b}-{i}",
            "q_v_n_clips": n_a,
            "c_v_n_clips": n_b,
        }
        for i in range(shared)
    ]


EDGES = (
    _edges("a1", "a2", 2, 4, 4)  # 2 of 4 clips of both: exactly 0.5, grouped
    + _edges("b1", "b2", 1, 4, 4)  # 1 of 4: not
    + _edges("c1", "c2", 2, 4, 8)  # 0.5 of c1 but 0.25 of c2: both must reach it, not
    + _edges("d1", "d2", 3, 6, 6)  # exactly 0.5 again, other counts
)
WANT = {"a1": "a1", "a2": "a1", "d1": "d1", "d2": "d1"}


def test_reference_grouping_includes_exactly_min_frac():
    cols = ("q_video", "q_clip", "c_video", "c_clip", "q_v_n_clips", "c_v_n_clips")
    assert ref_groups([tuple(e[c] for c in cols) for e in EDGES], 0.5) == WANT


def test_distributed_grouping_includes_exactly_min_frac(tmp_path):
    import pyarrow as pa

    store = Store(str(tmp_path))
    files = []
    for i in range(2):  # two search blocks of copy edges
        write_parquet(store, f"copies/block-{i}.parquet", pa.Table.from_pylist(EDGES[i::2]))
        files.append(f"copies/block-{i}.parquet")
    res = dist_groups(store, files, "dedup", "dedup/groups.parquet", {"near_dup_min_frac": 0.5}, "sequential")
    assert read_groups(store, "dedup/groups.parquet") == WANT
    assert (res["near_duplicate_videos"], res["near_duplicate_groups"]) == (4, 2)


# ---------------------------------------------------------------------------------------------------------
# the held-out split: eval_frac of the sources, not 1 - eval_frac


@pytest.mark.parametrize("eval_frac", [0.1, 0.3])
def test_split_sends_about_eval_frac_of_sources_to_eval(eval_frac):
    n = 4000
    held = sum(split_of(f"v{i:05d}", eval_frac, seed=1) == "eval" for i in range(n))
    sd = math.sqrt(n * eval_frac * (1 - eval_frac))
    assert abs(held - n * eval_frac) < 5 * sd, held
    assert all(split_of(f"v{i:05d}", 0.0, seed=1) == "train" for i in range(200))
    assert all(split_of(f"v{i:05d}", 1.0, seed=1) == "eval" for i in range(200))


# ---------------------------------------------------------------------------------------------------------
# the plan step on synthetic committed videos (60 videos of 4 clips; gather and pairs run once and are
# reused by step hash, each write_shards variant plans and writes again)

N_CLIPS, CLIPS_PER_VIDEO = 240, 4


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("rules"))
    make_videos(root, N_CLIPS, dim=16, clips_per_video=CLIPS_PER_VIDEO)
    return root


def _run(root: str, **write) -> tuple[dict, list[dict]]:
    """The global phase with these write_shards params; the summary and every planned sample's row (its
    ``meta`` parsed)."""
    import pyarrow.parquet as pq

    specs = [
        StageSpec(stage="pair", params={"low": 0.6, "high": 0.99}),
        StageSpec(stage="write_shards", params={"maxcount": 1000, **write}),
    ]
    store = Store(root)
    summary = run_global(specs, store, StageContext(out_dir=root), "synth", runner="sequential")
    plans = []
    for rel in sorted(store.list(f"global/plans-{summary['global_hash']}/", ".parquet")):
        part = int(rel.rsplit("part-", 1)[1].split(".")[0])
        for p in pq.read_table(io.BytesIO(store.read_bytes(rel))).to_pylist():
            plans.append({**p, "meta": json.loads(p["meta"]), "partition": part})
    assert len(plans) == summary["triplets_out"]
    return summary, plans


def _categories(p: dict) -> set[str]:
    return {s["category"] for s in p["meta"]["subjects"]}


def test_held_out_split_of_the_plans_is_about_eval_frac(synth):
    summary, plans = _run(synth, eval_frac=0.2, partitions=2)
    n_videos = N_CLIPS // CLIPS_PER_VIDEO
    held = {p["video_id"] for p in plans if p["split"] == "eval"}
    assert summary["eval_videos"] == len(held)
    assert 0.05 * n_videos <= len(held) <= 0.4 * n_videos  # 12 of 60 here; the flipped rule gives ~48
    for p in plans:
        assert p["split"] == split_of(p["meta"]["source_group"], 0.2, 0)


def test_scenario_quota_is_split_across_partitions(synth):
    """Each of the 4 partitions keeps its share ceil(quota / 4) of the primary scenario, lowest draws
    first, so the total stays at the quota (a partition keeping the whole quota would keep up to 4x)."""
    _, free = _run(synth, partitions=4)
    people = [p for p in free if p["scenario"] == "people"]
    assert len(people) > 40  # plenty in every partition, so a cap has work to do
    quota, n_part = 8, 4
    summary, capped = _run(synth, partitions=n_part, scenario_quotas={"people": quota})
    assert summary["partitions"] == n_part
    kept = [p for p in capped if p["scenario"] == "people"]
    share = math.ceil(quota / n_part)
    assert len(kept) <= n_part * share == quota
    assert len(kept) == quota  # every partition had more than its share
    assert summary["rejections_by_reason"]["write_shards:scenario_quota"] == len(people) - quota
    assert {p["key"] for p in capped if p["scenario"] != "people"} == {
        p["key"] for p in free if p["scenario"] != "people"
    }  # other scenarios untouched
    for part in range(n_part):  # in each partition its lowest draws are the ones kept
        mine = sorted((p["draw"], p["key"]) for p in people if p["partition"] == part)
        assert len(mine) > share
        assert sorted((p["draw"], p["key"]) for p in kept if p["partition"] == part) == mine[:share]


def test_category_weights_drop_and_thin_their_samples(synth):
    _, free = _run(synth, partitions=2)
    only = {c: [p for p in free if _categories(p) == {c}] for c in ("human", "animal")}
    assert len(only["human"]) > 20 and len(only["animal"]) > 20
    summary, got = _run(synth, partitions=2, category_weights={"human": 0.0, "animal": 0.5})
    assert not [p for p in got if _categories(p) == {"human"}]  # weight 0: every human-only sample gone
    animal = [p for p in got if _categories(p) == {"animal"}]
    assert 0.2 * len(only["animal"]) <= len(animal) <= 0.8 * len(only["animal"])  # about half kept
    # a mixed sample keeps its largest weight: a human with a product or a landmark survives a human weight 0
    mixed = [p for p in free if "human" in _categories(p) and not _categories(p) & {"animal"}]
    mixed = [p for p in mixed if len(_categories(p)) > 1]
    assert mixed and {p["key"] for p in mixed} <= {p["key"] for p in got}
    dropped = len(free) - len(got)
    assert dropped > 0 and summary["rejections_by_reason"]["write_shards:category_balance"] == dropped


def test_scenario_weights_drop_and_thin_their_samples(synth):
    _, free = _run(synth, partitions=2)

    def labelled(plans, labels):
        return [p for p in plans if p["meta"]["scenarios"] == labels]

    assert len(labelled(free, ["animals"])) > 20 and len(labelled(free, ["objects"])) > 20
    summary, got = _run(synth, partitions=2, scenario_weights={"animals": 0.0, "objects": 0.5})
    assert not labelled(got, ["animals"])  # weight 0: every animals-only sample gone
    n_obj, n_obj_free = len(labelled(got, ["objects"])), len(labelled(free, ["objects"]))
    assert 0.2 * n_obj_free <= n_obj <= 0.8 * n_obj_free  # about half kept
    # an animal in a field also carries "backgrounds" (no weight, 1.0): kept
    in_field = labelled(free, ["animals", "backgrounds"])
    assert in_field and {p["key"] for p in in_field} <= {p["key"] for p in got}
    dropped = len(free) - len(got)
    assert dropped > 0 and summary["rejections_by_reason"]["write_shards:scenario_weight"] == dropped
