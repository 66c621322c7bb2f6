"""The sample curated on a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, every listener
on 127.0.0.1), from and into a real S3 API (moto's server on loopback), each node's workers with their own
local scratch root (``PHANTOM_CACHE_DIR``, given to the node's raylet), the driver with a third: the same
shards as the sequential runner, work on both nodes, and no scratch file left on any node."""

import contextlib
import copy
import hashlib
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

import curation.execute  # noqa: F401  (sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before ray is imported)
from bench.bench_map_io import sample_rows_in_store
from curation.config import RayConfig
from curation.execute import STORAGE_ENV, init_ray
from tests.curation.test_runner import ray_listeners

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def _env_without(keys):
    """This process's environment without ``keys`` inside the block (processes started there lack them)."""
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
VIDEOS = ("gen01", "gen02")


def _sample_rows(src_uri: str) -> list[dict]:
    """The sample's ``VIDEOS`` as source rows whose videos are objects under ``src_uri`` (uploaded here)."""
    rows = sample_rows_in_store(src_uri, VIDEOS)
    assert sorted(r["video_id"] for r in rows) == sorted(VIDEOS)
    return rows


def _curate(rows: list[dict], out: str, runner: str):
    from curation.config import load_config
    from curation.runner import run_pipeline
    from curation.stage import StageContext

    cfg = load_config(str(REPO / "pipelines.yaml"))
    rows = copy.deepcopy(rows)  # each run gets rows of its own
    return run_pipeline(cfg, "default", rows, StageContext(out_dir=out, models_dir=cfg.models_dir),
                        runner=runner, out=out)


def _published(out: str) -> dict:
    """What a run published: its global hash, and per shards folder the index and each shard's sha256 (the
    shards read back from the store and checked against the index)."""
    from curation.shards import list_shards, read_index
    from curation.storage import Store

    store = Store(out)
    cur = store.read_json("global/current.json")
    got = {"global_hash": cur["global_hash"]}
    for sub in sorted(cur["folders"]):
        uris = list_shards(f"{out}/{sub}", verify_sha256=True)
        got[sub] = {"index": read_index(f"{out}/{sub}"),
                    "sha256": [hashlib.sha256(Store(u.rsplit("/", 1)[0]).read_bytes(u.rsplit("/", 1)[1]))
                               .hexdigest() for u in uris]}
    return got


def _files(root: str) -> set[str]:
    out = set()
    for d, _, names in os.walk(root):
        out.update(os.path.relpath(os.path.join(d, n), root) for n in names)
    return out


class _Watch:
    """Polls the scratch roots while the run goes on and records every file seen under each (relative
    path); the files a worker writes live for the duration of its group call, seconds on this footage."""

    def __init__(self, roots: dict[str, str], period_s: float = 0.05):
        self.roots, self.period_s = roots, period_s
        self.seen: dict[str, set[str]] = {k: set() for k in roots}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            for k, root in self.roots.items():
                self.seen[k] |= _files(root)
            time.sleep(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _objects(out: str) -> dict[str, bytes]:
    from curation.storage import Store

    store = Store(out)
    return {rel: store.read_bytes(rel) for rel in store.list()}


@pytest.fixture
def short_tmp():
    """A fresh folder with a short path (Ray's unix socket paths live under RAY_TMPDIR), removed after."""
    base = tempfile.mkdtemp(prefix="mn-")
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_two_node_cluster_gives_the_sequential_shards_with_node_local_scratch(s3_bucket, short_tmp,
                                                                              monkeypatch):
    """Each node's workers get their own scratch root (``PHANTOM_CACHE_DIR`` in the raylet's environment,
    checked with a task pinned to each node), the driver a third. A group that ran on one node and read a
    file that a group on the other node had written only to its local scratch would look for it under its
    own root and not find it there (nor in the store): its rows would fail (``videos_failed``), or carry
    less, and the shards would differ from the sequential runner's, where every group shares one root. And
    no row handed from group to group names a file by an absolute path into any scratch root (checked on
    every object the run wrote), so a group reaches another node's scratch neither by a relative path (a
    different root) nor by an absolute one (none is handed on). So equal shards, no failed video and no
    scratch path in the store prove that every file a group read came from the store or from its own node.
    The watch also shows files under both nodes' roots during the run (work on both nodes), and none after
    it (the runner deletes a video's scratch files once the video has left the group)."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    base = short_tmp
    roots = {name: os.path.join(base, name) for name in ("driver", "node0", "node1")}
    for r in roots.values():
        os.makedirs(r)
    monkeypatch.setenv("PHANTOM_CACHE_DIR", roots["driver"])
    # this cluster's address file goes here, not to /tmp/ray where another ray.init() on the machine looks
    monkeypatch.setenv("RAY_TMPDIR", os.path.join(base, "ray"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    rows = _sample_rows(f"{s3_bucket}/src")
    t0 = time.time()
    seq = _curate(rows, f"{s3_bucket}/seq", "sequential")
    t_seq = time.time() - t0
    assert seq.totals["videos_failed"] == 0 and seq.global_summary

    # two logical CPUs a node: with one, the two model actor pools (0.5 CPU each, spread one per node) leave
    # no node a whole CPU for Ray Data's 1-CPU read task, which then waits forever
    common = {"num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    # the nodes start without the store's settings, as a real cluster's nodes do: the map workers reach
    # the S3 server only through what the driver's job passes them (init_ray's runtime_env)
    with _env_without(STORAGE_ENV):
        cluster = Cluster(initialize_head=True,
                          head_node_args={**common, "env_vars": {"PHANTOM_CACHE_DIR": roots["node0"]}})
    try:
        with _env_without(STORAGE_ENV):
            cluster.add_node(**common, env_vars={"PHANTOM_CACHE_DIR": roots["node1"]})
        cluster.wait_for_nodes()
        init_ray(RayConfig(address=cluster.address))
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        assert len(nodes) == 2

        @ray.remote(num_cpus=0.1)
        def where():
            return ray.get_runtime_context().get_node_id(), os.environ.get("PHANTOM_CACHE_DIR")

        seen = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                        .remote() for n in nodes])
        node_root = dict(seen)
        assert [s[0] for s in seen] == nodes
        assert sorted(node_root.values()) == [roots["node0"], roots["node1"]], seen

        t0 = time.time()
        with _Watch({"node0": roots["node0"], "node1": roots["node1"]}) as watch:
            par = _curate(rows, f"{s3_bucket}/ray", "ray")
        t_ray = time.time() - t0
        listeners, bad = ray_listeners()
    finally:
        ray.shutdown()
        cluster.shutdown()
        monkeypatch.delenv("RAY_TMPDIR")

    assert not bad, "Ray listens beyond loopback:\n" + "\n".join(bad)
    assert len(listeners) >= 3, listeners  # the check saw the cluster: GCS and both raylets at least
    assert par.totals["videos_failed"] == 0 and par.videos_committed == len(VIDEOS)
    assert par.totals == seq.totals
    # (1) the same shards, byte for byte, under the same global hash
    assert _published(par.store_uri) == _published(seq.store_uri)
    # (2) both nodes did work: each node's root held per-video files (clips, refs, fetched copies) in the run
    for name in ("node0", "node1"):
        assert any(v in p for p in watch.seen[name] for v in VIDEOS), (name, sorted(watch.seen[name]))
    # (3) no scratch file is left anywhere: the nodes' roots and the driver's
    for name, root in roots.items():
        left = _files(os.path.join(root, "scratch"))
        assert left == set(), (name, sorted(left)[:20])
    # (4) no object the Ray run wrote (group caches, manifest, tables, shards) names a scratch root
    leaks = [(rel, r) for rel, data in _objects(par.store_uri).items() for r in roots.values()
             if r.encode() in data]
    assert not leaks, leaks
    print(f"\nsequential {t_seq:.1f} s, two-node Ray {t_ray:.1f} s; files seen per node: "
          f"{ {k: len(v) for k, v in watch.seen.items()} }")
