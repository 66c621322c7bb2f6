"""The global phase is incremental, on a real local Ray and the real store: videos committed after a run are
gathered into a new generation and searched new x all and all x new only (the search work is counted), the
published shards are byte-identical to a from-scratch run over all the videos (exact search), a run with
nothing new does no search work, a changed video starts a new epoch, and the IVF search reuses its centroids
and finds the planted pairs a from-scratch run finds."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.dataset as pds
import pytest

from curation.config import StageSpec
from curation.demo.tables import make_videos
from curation.global_phase import run_global
from curation.global_phase.tables import write_parquet
from curation.stage import StageContext
from curation.storage import Store

PAIR = {"low": 0.6, "high": 0.99, "candidates": 8}
WRITE = {"maxcount": 16, "clips_per_partition": 100}


@pytest.fixture(scope="module")
def ray_local():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


def _run(root: Path, runner: str = "ray", pair: dict | None = None) -> dict:
    specs = [
        StageSpec(stage="pair", params=pair or PAIR),
        StageSpec(stage="write_shards", params=WRITE),
    ]
    ctx = StageContext(out_dir=str(root), config_hash="cafe0123")
    return run_global(specs, Store(str(root)), ctx, "synth", runner=runner)


def _published(root: Path) -> dict:
    shards = root / "shards"
    return {
        "index": (shards / ".index.json").read_bytes(),
        "tars": {p.name: p.read_bytes() for p in sorted(shards.glob("shard-*.tar"))},
    }


def _pairs(root: Path, summary: dict, verdict: str | None = "pair") -> set:
    files = sorted((root / f"global/pairs-{summary['pair_hash']}/pairs").rglob("*.parquet"))
    t = pds.dataset([str(f) for f in files], format="parquet").to_table()
    rows = zip(*(t.column(c).to_pylist() for c in ("q_clip", "q_subject", "c_clip", "c_subject", "verdict")))
    return {r[:4] + (r[4],) for r in rows if verdict is None or r[4] == verdict}


def _hide(root: Path, every: int, side: Path) -> list[str]:
    """Move the tables of every ``every``-th video aside (not committed yet); returns the moved paths."""
    tables = root / "tables" / "synth"
    vids = sorted({p.stem for p in (tables / "clips").rglob("*.parquet")})
    hidden = set(vids[every // 2 :: every])
    moved = []
    for p in sorted(tables.rglob("*.parquet")):
        if p.stem in hidden:
            rel = p.relative_to(root)
            (side / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(p, side / rel)
            moved.append(str(rel))
    return moved


def _restore(root: Path, side: Path, moved: list[str]) -> None:
    for rel in moved:
        shutil.move(side / rel, root / rel)


def _state(root: Path) -> dict:
    return json.loads((root / "global/gen-synth/state.json").read_text())


def _expected_work(state: dict) -> tuple[int, int]:
    """(distance computations of the last generation's run, those of a from-scratch run) of the exact
    search: a category of n units costs n x n from scratch; its new units cost new x all and old x new."""
    gens = state["generations"]
    keys = {k for g in gens for k in g["units"]}
    inc = full = 0
    for k in keys:
        old = sum(g["units"].get(k, 0) for g in gens[:-1])
        n = old + gens[-1]["units"].get(k, 0)
        if n >= 2:
            full += n * n
            inc += n * n - (old * old if old >= 2 else 0)
    return inc, full


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Synthetic committed videos (their tables and media), and the published result of a from-scratch run
    over all of them."""
    tables = tmp_path_factory.mktemp("tables")
    make_videos(str(tables), 300, dim=16, clips_per_video=5)
    fresh = tmp_path_factory.mktemp("fresh") / "run"
    shutil.copytree(tables, fresh)
    summary = _run(fresh, runner="sequential")
    assert summary["triplets_out"] > 0 and summary["generations"] == 1
    return tables, fresh, summary


def test_adding_videos_redoes_only_their_blocks_and_matches_a_fresh_run(synth, tmp_path, ray_local):
    tables, fresh, want = synth
    root, side = tmp_path / "run", tmp_path / "side"
    shutil.copytree(tables, root)
    moved = _hide(root, 10, side)  # a tenth of the videos come later
    first = _run(root)
    assert first["generations"] == 1 and first["pair_hash"] != want["pair_hash"]
    partials = {p: p.stat().st_mtime_ns for p in root.glob("global/search-*/exact/**/*.parquet")}
    gen0 = {p: p.stat().st_mtime_ns for p in root.glob("global/gen-synth/e0000-g0000/**/*.parquet")}
    assert partials and gen0

    _restore(root, side, moved)
    second = _run(root)
    state = _state(root)
    assert second["generations"] == 2 and second["new_videos"] == len(moved) // 2  # units + clips files
    # only the new generation's blocks ran: new x (old + new) and old x new; the old ones are untouched
    inc, full = _expected_work(state)
    assert (
        second["search"]["scored"] == inc
        and first["search"]["scored"] == _expected_work({"generations": state["generations"][:1]})[1]
    )
    assert inc < 0.25 * full
    assert all(p.stat().st_mtime_ns == t for p, t in partials.items())
    assert all(p.stat().st_mtime_ns == t for p, t in gen0.items())
    added = set(root.glob("global/search-*/exact/**/*.parquet")) - set(partials)
    assert added and all("/g0001/" in str(p) or p.name == "h0001.parquet" for p in added)
    # the same result as a from-scratch run over every video: the same hashes, pairs and bytes
    assert (second["pair_hash"], second["global_hash"]) == (want["pair_hash"], want["global_hash"])
    assert _pairs(root, second, None) == _pairs(fresh, want, None)
    assert _published(root) == _published(fresh)
    assert second["triplets_out"] == want["triplets_out"]

    # nothing new: the scan finds nothing, no generation is added, nothing is searched
    t_state = (root / "global/gen-synth/state.json").stat().st_mtime_ns
    again = _run(root)
    assert again.get("resumed") and again["search"]["scored"] == 0
    assert (root / "global/gen-synth/state.json").stat().st_mtime_ns == t_state
    # ... even when the later steps' done markers are gone (as the runner drops them): every block is kept
    for done in root.glob("global/**/_*done.json"):
        done.unlink()
    redo = _run(root)
    assert (redo["search"]["scored"], redo["search"]["read"], redo["search"]["tasks_run"]) == (0, 0, 0)
    assert redo["search"]["tasks_skipped"] > 0 and redo["generations"] == 2
    assert _published(root) == _published(fresh)


def test_a_changed_video_starts_a_new_epoch_that_matches_a_fresh_run(synth, tmp_path):
    tables, _, _ = synth
    root, fresh = tmp_path / "run", tmp_path / "fresh"
    shutil.copytree(tables, root)
    first = _run(root, runner="sequential")
    # one video exported again with one unit fewer (its source changed): its old units must not stay
    store = Store(str(root))
    rel = next(store.list("tables/synth/units/", ".parquet"))
    t = pds.dataset(store.path(rel), format="parquet").to_table()
    write_parquet(store, rel, t.slice(1))
    shutil.copytree(root, fresh, ignore=shutil.ignore_patterns("global", "shards*"))
    second = _run(root, runner="sequential")
    want = _run(fresh, runner="sequential")
    assert _state(root)["epoch"] == 1 and second["generations"] == 1
    assert second["units"] == want["units"] != first["units"]
    assert (second["pair_hash"], second["global_hash"]) == (want["pair_hash"], want["global_hash"])
    assert _published(root) == _published(fresh)
    # the first result's step folders and the first epoch's generations are gone; the new ones stay
    steps = set(store.subdirs("global"))
    assert f"pairs-{second['pair_hash']}" in steps and f"plans-{second['global_hash']}" in steps
    assert f"pairs-{first['pair_hash']}" not in steps and f"plans-{first['global_hash']}" not in steps
    assert sum(d.startswith("search-") for d in steps) == 1
    assert [d[:6] for d in store.subdirs("global/gen-synth")] == ["e0001-"]
    assert _run(root, runner="sequential")["global_hash"] == second["global_hash"]  # still resumes


def _planted(root: Path, n_videos: int = 240, per: int = 6, dim: int = 64) -> None:
    """Units tables of a planted set: identities of four units each, in four different videos, tight around
    their identity (cosine about 0.95, in the band), far from the others (about 0 +- 0.13)."""
    import numpy as np
    import pyarrow as pa

    from curation.global_phase.tables import bucket_of, unit_schema

    rng = np.random.default_rng(7)
    n_ids = n_videos * per // 4
    base = rng.standard_normal((n_ids, dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    slots = rng.permutation(np.repeat(np.arange(n_ids), 4)).reshape(n_videos, per)
    store = Store(str(root))
    for v in range(n_videos):
        vid = f"p{v:05d}"
        x = base[slots[v]] + 0.03 * rng.standard_normal((per, dim)).astype(np.float32)
        rows = [
            {
                "kind": "subject",
                "bucket": bucket_of(vid),
                "video_id": vid,
                "clip_id": f"{vid}-{i:02d}",
                "subject": 0,
                "category": "human",
                "vector": (x[i] / np.linalg.norm(x[i])).tolist(),
                "phashes": [],
                "crop_path": "c.jpg",
                "crop_box": [0, 0, 1, 1],
                "crop_box_tight": [0, 0, 1, 1],
                "crop_ref": 0,
                "ref_t_s": 0.0,
                "ref_frame_index": 0,
                "v_n_clips": per,
            }
            for i in range(per)
        ]
        rel = f"tables/m/units/{bucket_of(vid):02x}/{vid}.parquet"
        write_parquet(store, rel, pa.Table.from_pylist(rows, schema=unit_schema()))


def _planted_partners(n_videos: int = 240, per: int = 6) -> dict:
    import numpy as np

    rng = np.random.default_rng(7)
    n_ids = n_videos * per // 4
    rng.standard_normal((n_ids, 64))
    slots = rng.permutation(np.repeat(np.arange(n_ids), 4)).reshape(n_videos, per)
    units = [
        (f"p{v:05d}", f"p{v:05d}-{i:02d}", int(slots[v, i])) for v in range(n_videos) for i in range(per)
    ]
    by_id: dict = {}
    for v, c, k in units:
        by_id.setdefault(k, []).append((v, c))
    return {c: {c2 for v2, c2 in by_id[k] if v2 != v} for v, c, k in units}


def _ivf_pairs(root: Path, pp: dict, tag: str, runner: str) -> tuple[set, dict]:
    from curation.global_phase.gather import gather_generations
    from curation.global_phase.pairs import find_pairs

    store = Store(str(root))
    gather = gather_generations(store, "m", "g", runner)
    done = find_pairs(store, gather, pp, f"p-{tag}", runner, search_dir="s")
    files = [store.path(f) for f in done["files"]["subject"]]
    t = pds.dataset(files, format="parquet").to_table()
    cols = ("q_clip", "c_clip", "verdict")
    pairs = {(q, c) for q, c, v in zip(*(t.column(k).to_pylist() for k in cols)) if v == "pair"}
    return pairs, {**done["search"], "generations": len(gather["generations"])}


def test_ivf_reuses_its_centroids_and_finds_the_planted_pairs_of_a_fresh_run(tmp_path, ray_local):
    """A category on the IVF path: the new generation is assigned to the centroids trained on the first one
    (trained once, never again) and searched new x all and all x new (a small share of the work of a
    from-scratch run). With the same centroids a from-scratch run gives exactly the same candidates; with
    its own (trained on every unit) both find the planted pairs and agree on all but a few."""
    import dataclasses

    from curation.global_phase import PairParams

    pp = dataclasses.asdict(PairParams(low=0.8, high=0.99, candidates=8, method="faiss", nprobe=4))
    root, side, fresh, same = (tmp_path / d for d in ("run", "side", "fresh", "same"))
    _planted(root)
    shutil.copytree(root, fresh)
    shutil.copytree(root, same)
    tables = root / "tables" / "m"
    moved = []
    for i, p in enumerate(sorted(tables.rglob("*.parquet"))):
        if i % 25 == 3:  # 4 % of the videos come later
            rel = p.relative_to(root)
            (side / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(p, side / rel)
            moved.append(str(rel))
    _, w1 = _ivf_pairs(root, pp, "1", "ray")
    cents = {p: p.stat().st_mtime_ns for p in root.glob("s/ivf/**/centroids.npy")}
    assert len(cents) == 1 and w1["scored"] > 0
    _restore(root, side, moved)
    got, w2 = _ivf_pairs(root, pp, "2", "ray")
    assert w2["generations"] == 2
    assert {p: p.stat().st_mtime_ns for p in root.glob("s/ivf/**/centroids.npy")} == cents
    # a from-scratch run given the same centroids: the same candidates, scores and verdicts, row for row
    trained = next(root.glob("s/ivf/subject/*/trained.json"))
    for f in [trained, *trained.parent.glob("n*/centroids.npy"), *trained.parent.glob("n*/train.json")]:
        dst = same / f.relative_to(root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    same_pairs, ws = _ivf_pairs(same, pp, "s", "sequential")
    assert ws["generations"] == 1 and same_pairs == got
    assert _raw_rows(root, "p-2") == _raw_rows(same, "p-s")
    assert 0 < w2["scored"] < 0.15 * ws["scored"]
    # a from-scratch run with its own centroids: the planted pairs (three partners per unit, fewer where an
    # identity is twice in one video) found by both, the two results nearly the same
    want, wf = _ivf_pairs(fresh, pp, "f", "sequential")
    truth = {(c, d) for c, ds in _planted_partners().items() for d in ds}
    assert (
        len(truth) > 4000 and len(got & truth) >= 0.99 * len(truth) and len(want & truth) >= 0.99 * len(truth)
    )
    assert len(got & want) >= 0.99 * len(got | want)


def _raw_rows(root: Path, pdir: str) -> list:
    files = sorted(str(p) for p in (root / pdir / "pairs").rglob("*.parquet"))
    t = pds.dataset(files, format="parquet").to_table()
    return sorted(map(json.dumps, t.drop_columns(["bucket"]).to_pylist()))
