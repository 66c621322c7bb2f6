"""The distributed global phase end to end on real clips and crops: identity vetoes, grouping by video,
near-duplicate videos, the held-out split, scenario quotas, reuse by step hash, Ray == sequential, S3, and
the driver's memory on a synthetic 5k-clip run."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from curation.global_phase import PairParams, pair_rows, split_of
from curation.shards import read_index
from tests.curation.test_shards import PAIR, _state, make_rows, samples_of, write


def _metas(shards) -> dict[str, dict]:
    return {k: json.loads(s["json"]) for k, s in samples_of(shards).items()}


def test_face_id_rejection_vetoes_the_embedding_pair(tmp_path):
    """Two men who look alike to the image embedder (in the band) but whose faces are two people: no
    cross-pair may give one the other's reference (the old writer fell back to the embedding pair)."""
    rows = make_rows(str(tmp_path), n_videos=4, photos=["man", "cat"], faces={"v00": "A", "v02": "B"})
    summary = write(tmp_path, rows)
    metas = _metas(tmp_path / "shards")
    assert {k for k, m in metas.items() if m["pair_type"] == "cross_pair"} == {
        "v01-0000_cross_pair0",
        "v03-0000_cross_pair0",
    }  # the cats only
    assert summary["rejections_by_reason"]["pair:face_rejected"] == 2


def test_face_id_match_pairs_and_records_both_scores(tmp_path):
    rows = make_rows(str(tmp_path), n_videos=4, photos=["man", "cat"], faces={"v00": "A", "v02": "A"})
    write(tmp_path, rows)
    m = _metas(tmp_path / "shards")["v00-0000_cross_pair0"]
    man = m["subjects"][0]
    assert (
        man["identity"] == "face_match" and man["ref"]["video_id"] == "v02" and man["ref"]["kind"] == "cross"
    )
    assert man["face_similarity"] > 0.5 and 0.78 <= man["similarity"] <= 0.99


def test_one_subject_in_two_clips_of_one_video_never_pairs(tmp_path):
    """Pairs are grouped by source video: the same cat in two shots of one video is an in-video pair, never a
    cross-video one; a third shot in another video pairs with both."""
    rows = make_rows(str(tmp_path), n_videos=2, photos=["cat", "cup"])
    second = copy.deepcopy(rows[0])
    second["clip_id"] = "v00-0001"
    rng = np.random.default_rng(5)
    emb = np.load(tmp_path / rows[0]["embedding_file"])
    for rel in ("embeddings/v00/v00-0001.npy", "embeddings/v09/v09-0000.npy"):
        noisy = emb + 0.3 * rng.standard_normal(emb.shape).astype(np.float32) / np.sqrt(emb.shape[1])
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        np.save(tmp_path / rel, noisy / np.linalg.norm(noisy, axis=1, keepdims=True))
    second["embedding_file"] = "embeddings/v00/v00-0001.npy"
    for c in second["subjects"][0]["crops"]:
        c["phash"] = f"{int(rng.integers(0, 2**63)):016x}"
    third = copy.deepcopy(second)
    third.update(video_id="v09", clip_id="v09-0000", embedding_file="embeddings/v09/v09-0000.npy")
    for c in third["subjects"][0]["crops"]:
        c["phash"] = f"{int(rng.integers(0, 2**63)):016x}"
    rows = [rows[0], second, rows[1], third]
    out = pair_rows(rows, PairParams(**PAIR), str(tmp_path))
    partners = {r["clip_id"]: {q["clip_id"] for q in r["subjects"][0].get("pairs") or []} for r in out}
    assert partners["v00-0000"] == partners["v00-0001"] == {"v09-0000"}
    assert partners["v09-0000"] == {"v00-0000", "v00-0001"}


def _reupload_rows(tmp_path):
    """v00: a man in two shots; v03: a re-upload of v00 (same shots, same crops, other name); v01 / v02 cats;
    v04 another man."""
    rows = make_rows(str(tmp_path), n_videos=5, photos=["man", "cat", "cat", "cup", "man"])
    rng = np.random.default_rng(7)
    shot2 = copy.deepcopy(rows[0])
    shot2["clip_id"] = "v00-0001"
    emb = np.load(tmp_path / rows[0]["embedding_file"])
    noisy = emb + 0.5 * rng.standard_normal(emb.shape).astype(np.float32) / np.sqrt(emb.shape[1])
    np.save(tmp_path / "embeddings/v00/v00-0001.npy", noisy / np.linalg.norm(noisy, axis=1, keepdims=True))
    shot2["embedding_file"] = "embeddings/v00/v00-0001.npy"
    for c in shot2["subjects"][0]["crops"]:
        c["phash"] = f"{int(rng.integers(0, 2**63)):016x}"
    v00 = [rows[0], shot2]
    reup = []
    for r in v00:
        r2 = copy.deepcopy(r)
        r2.update(video_id="v03", clip_id=r["clip_id"].replace("v00", "v03"))
        reup.append(r2)
    return [r for r in rows if r["video_id"] not in ("v00", "v03")] + v00 + reup


def test_reuploads_are_one_source(tmp_path):
    rows = _reupload_rows(tmp_path)
    summary = write(tmp_path, rows)
    assert (summary["near_duplicate_videos"], summary["near_duplicate_groups"]) == (2, 1)
    assert summary["pair_verdicts"]["subject"]["near_duplicate_source"] >= 2
    for m in _metas(tmp_path / "shards").values():
        if m["video_id"] in ("v00", "v03"):
            assert m["source_group"] == "v00"
            assert all(
                s["ref"]["video_id"] not in ("v00", "v03") or m["pair_type"] == "in_pair"
                for s in m["subjects"]
            )


def test_without_near_duplicate_grouping_the_reupload_pairs_across_its_shots(tmp_path):
    """The same data with grouping off: shot 1 of v00 takes shot 2 of its re-upload as a cross-video partner
    (what the grouping exists to stop), so the test above can fail."""
    rows = _reupload_rows(tmp_path)
    off = pair_rows(rows, PairParams(**PAIR, near_dup_min_frac=-1.0), str(tmp_path))
    on = pair_rows(rows, PairParams(**PAIR), str(tmp_path))
    by = {r["clip_id"]: r["subjects"][0] for r in off}
    assert "v03-0001" in {q["clip_id"] for q in by["v00-0000"]["pairs"]}
    by = {r["clip_id"]: r["subjects"][0] for r in on}
    assert "v03-0001" not in {q["clip_id"] for q in by["v00-0000"]["pairs"]}
    assert {q["clip_id"]: q["reason"] for q in by["v00-0000"]["pair_rejections"]}["v03-0001"] == (
        "near_duplicate_source"
    )


def test_held_out_split_keeps_sources_and_near_duplicates_together(tmp_path):
    rows = _reupload_rows(tmp_path)
    summary = write(tmp_path, rows, eval_frac=0.5, seed=3)
    train, held = _metas(tmp_path / "shards"), _metas(tmp_path / "shards_eval")
    assert train and held and summary["eval_triplets"] == len(held)
    assert summary["eval_videos"] == len({m["video_id"] for m in held.values()})
    for metas, split in ((train, "train"), (held, "eval")):
        for m in metas.values():
            assert m["split"] == split == split_of(m["source_group"], 0.5, 3)
            for s in m["subjects"]:  # a reference never comes from the other side
                assert (
                    split_of("v00" if s["ref"]["video_id"] == "v03" else s["ref"]["video_id"], 0.5, 3)
                    == split
                )
    assert {m["split"] for m in {**train, **held}.values() if m["video_id"] in ("v00", "v03")} in (
        {"train"},
        {"eval"},
    )


def test_scenario_quota_caps_a_scenario_and_counts_it(tmp_path):
    rows = make_rows(str(tmp_path))
    summary = write(tmp_path, rows, scenario_quotas={"people": 1})
    metas = _metas(tmp_path / "shards")
    people = [m for m in metas.values() if m["primary_scenario"] == "people"]
    assert len(people) == 1  # the man-only clip v05 (in-pair and cross-pair): capped to one
    assert summary["rejections_by_reason"]["write_shards:scenario_quota"] == 1
    assert summary["scenarios"]["animals"] == 4 and summary["scenarios"]["multi_person"] == 0


def test_changing_write_params_keeps_the_pairs_and_changing_pair_keeps_the_tables(tmp_path):
    rows = make_rows(str(tmp_path))
    first = write(tmp_path, rows, maxcount=4)
    pairs_done = tmp_path / f"global/pairs-{first['pair_hash']}/_done.json"
    gather_done = next(tmp_path.glob("global/gen-*/state.json"))
    partial = next(tmp_path.glob("global/search-*/exact/subject/*/g0000/b000000/h0000.parquet"))
    t_pairs, t_gather = pairs_done.stat().st_mtime_ns, gather_done.stat().st_mtime_ns
    t_partial = partial.stat().st_mtime_ns
    second = write(tmp_path, rows, maxcount=2)
    assert second["pair_hash"] == first["pair_hash"] and second["global_hash"] != first["global_hash"]
    assert pairs_done.stat().st_mtime_ns == t_pairs and second["shards"] == 6
    assert [e["samples"] for e in read_index(tmp_path / "shards")["shards"]] == [2] * 6
    third = write(tmp_path, rows, pair={"low": 0.5}, maxcount=2)
    assert third["pair_hash"] != first["pair_hash"] and gather_done.stat().st_mtime_ns == t_gather
    # the band is applied after the search: its partials are kept, and no score was computed again
    assert partial.stat().st_mtime_ns == t_partial and third["search"]["scored"] == 0
    assert first["search"]["scored"] > 0
    again = write(tmp_path, rows, pair={"low": 0.5}, maxcount=2)
    assert again.get("resumed") and again["triplets_out"] == third["triplets_out"]


@pytest.fixture(scope="module")
def ray_local():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_runner_writes_the_same_shards_as_the_sequential_one(tmp_path, ray_local):
    seq, dist = tmp_path / "seq", tmp_path / "ray"
    seq.mkdir()
    dist.mkdir()
    a = write(seq, make_rows(str(seq)), maxcount=3)
    b = write(dist, make_rows(str(dist)), maxcount=3, runner="ray")
    assert _state(seq / "shards") == _state(dist / "shards") and a["triplets_out"] == b["triplets_out"] == 12
    assert read_index(seq / "shards")["shards"] == read_index(dist / "shards")["shards"]


def test_global_phase_into_s3_and_back(tmp_path, s3_public_bucket):
    """Tables, pairs, plans and shards in a real S3 API (moto on loopback); the clips and crops are in the
    bucket as the map phase leaves them; the shards are read back with webdataset from the bucket."""
    s3_bucket = s3_public_bucket  # its shards are read over plain http too
    import webdataset as wds

    from curation.storage import Store

    rows = make_rows(str(tmp_path))
    store = Store(f"{s3_bucket}/run")
    for sub in ("clips", "refs"):
        for dirpath, _, files in os.walk(tmp_path / sub):
            for f in files:
                full = os.path.join(dirpath, f)
                store.put_file(os.path.relpath(full, tmp_path), full)
    summary = write(tmp_path, rows, store=store, maxcount=5)
    assert summary["triplets_out"] == 12 and not (tmp_path / "shards").exists()
    index = read_index(f"{s3_bucket}/run/shards")
    assert [e["samples"] for e in index["shards"]] == [5, 5, 2]
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    urls = [f"{endpoint}/{store.path('shards/' + e['name'])}" for e in index["shards"]]  # path-style URLs
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(got) == 12 and all(g["mp4"][4:8] == b"ftyp" for g in got)
    assert {g["__key__"] for g in got} >= {"v02-0000_cross_pair0", "v00-0000_in_pair0"}


_MEMORY_CHILD = textwrap.dedent("""
    import json, os, sys, tempfile
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from curation.config import StageSpec
    from curation.global_phase import run_global
    from curation.demo.tables import make_videos
    from curation.stage import StageContext
    from curation.storage import Store

    def hwm_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    def reset_hwm():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    specs = [StageSpec(stage="pair", params={"low": 0.6, "high": 0.99}),
             StageSpec(stage="write_shards", params={"maxcount": 500, "in_pair": False,
                                                      "clips_per_partition": 1000})]
    out = {}
    for n in [int(a) for a in sys.argv[1:]]:
        root = tempfile.mkdtemp()
        make_videos(root, n, dim=16, clips_per_video=50)
        reset_hwm()
        s = run_global(specs, Store(root), StageContext(out_dir=root), "synth", runner="ray")
        out[n] = {"hwm_mb": hwm_mb(), "triplets": s["triplets_out"]}
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_driver_memory_does_not_grow_with_clips(tmp_path):
    """The driver's peak RSS over a synthetic 5k-clip global phase on Ray stays within a few MB of a 1k-clip
    one (the peak is reset before each run; a warm-up run pays for imports and Ray's first jobs)."""
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, "100", "1000", "5000"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=os.getcwd(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    assert got[5000]["triplets"] > 4 * got[1000]["triplets"] > 0
    assert got[5000]["hwm_mb"] - got[1000]["hwm_mb"] < 40, got


def test_videos_joining_later_redo_the_global_steps_and_match_a_fresh_run(tmp_path):
    """Videos committed after a first global run are gathered into a second generation (whether or not the
    done markers are dropped); the data digest then keys new pairs and plans, and every shard whose content
    changed is rewritten: the result is byte-identical to a fresh run over all the videos."""
    early, fresh = tmp_path / "early", tmp_path / "fresh"
    early.mkdir()
    fresh.mkdir()
    first = write(early, make_rows(str(early), n_videos=4), maxcount=3)
    for done in early.glob("global/**/_*done.json"):
        done.unlink()
    later = write(early, make_rows(str(early), n_videos=6), maxcount=3)
    want = write(fresh, make_rows(str(fresh), n_videos=6), maxcount=3)
    assert later["pair_hash"] != first["pair_hash"] and later["triplets_out"] == want["triplets_out"] == 12
    assert (first["generations"], later["generations"], later["new_videos"]) == (1, 2, 2)
    assert _state(early / "shards") == _state(fresh / "shards")
