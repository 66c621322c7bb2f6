"""The one place that knows Ray: starting a local instance or joining a cluster, running items on Ray Data or
in this process, and a pool of long-lived workers (Ray actors or threads) with submit / wait / result."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
from typing import Any

from curation.config import RayConfig

# Read when `ray` is imported: a local Ray binds GCS, raylet, workers and agents to 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# The store's endpoint and credentials as the driver sees them reach the workers, also on a cluster.
# PHANTOM_CACHE_DIR is not passed on: each node keeps its own local scratch and cache folder.
STORAGE_ENV = ("AWS_ENDPOINT_URL", "PHANTOM_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "PHANTOM_CACHE_MAX_GB")


def storage_runtime_env() -> dict:
    """Ray remote options that pass the driver's storage settings to a worker (empty when there are none)."""
    env = {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}
    return {"runtime_env": {"env_vars": env}} if env else {}


def init_ray(ray_cfg: RayConfig | None = None) -> None:
    """Join ``ray_cfg.address`` (or RAY_ADDRESS), else start a local instance on loopback; no-op if up."""
    import ray

    if ray.is_initialized():
        return
    rc = ray_cfg or RayConfig()
    address = rc.address or os.environ.get("RAY_ADDRESS", "")
    if address:  # a cluster's nodes have their own environment: the store's settings go with the job
        ray.init(address=address, log_to_driver=True, runtime_env=storage_runtime_env().get("runtime_env"))
        return
    ray.init(
        num_cpus=rc.num_cpus,
        include_dashboard=rc.dashboard,
        dashboard_host=rc.dashboard_host,
        _node_ip_address=rc.node_ip,
        log_to_driver=True,
        configure_logging=False,
    )


# ---------------------------------------------------------------------------------------------------------
# Items: fn(item, **kwargs) -> small JSON-able dict, on Ray Data or in-process.

_REFS: dict = {}


def resolve(v):
    """ObjectRefs in fn_kwargs are fetched once per worker process (a shared table, a group map)."""
    import ray

    if isinstance(v, ray.ObjectRef):
        key = v.hex()
        if key not in _REFS:
            if len(_REFS) > 32:
                _REFS.clear()
            _REFS[key] = ray.get(v)
        return _REFS[key]
    return v


def _apply_batch(batch, fn, kwargs):
    import pandas as pd

    kw = {k: resolve(v) for k, v in kwargs.items()}
    return pd.DataFrame({"r": [json.dumps(fn(json.loads(s), **kw)) for s in batch["item"]]})


def _plain(v) -> bool:
    return isinstance(v, (str, int, float, bool, type(None))) or getattr(v, "ray_plain", False)


def run_items(items: list[dict], fn, runner: str, num_cpus: float = 1.0, **kwargs) -> list[dict]:
    """``fn(item, **kwargs)`` for every item, returning its small JSON-able result: on Ray Data
    (``map_batches``, one item per batch) when ``runner == "ray"``, else in this process. Results come back
    in item order. Large kwargs are put in the object store once (plain values and objects that say
    ``ray_plain = True``, such as a Store, travel as they are)."""
    if not items:
        return []
    if runner == "sequential":
        return [fn(json.loads(json.dumps(it)), **kwargs) for it in items]
    import ray

    tagged = [{"item": json.dumps({**it, "_order": i})} for i, it in enumerate(items)]
    kw = {k: v if isinstance(v, ray.ObjectRef) or _plain(v) else ray.put(v) for k, v in kwargs.items()}
    ds = ray.data.from_items(tagged, override_num_blocks=len(tagged))
    out = ds.map_batches(
        _apply_batch,
        fn_kwargs={"fn": _keep_order(fn), "kwargs": kw},
        batch_size=1,
        num_cpus=num_cpus,
        batch_format="pandas",
    )
    res = [json.loads(r["r"]) for r in out.iter_rows()]
    res.sort(key=lambda r: r.get("_order", 0))
    for r in res:
        r.pop("_order", None)
    return res


class _KeepOrder:
    """Carries an item's position through ``fn`` so Ray's out-of-order results can be put back in order."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "fn")

    def __call__(self, item: dict, **kw) -> dict:
        order = item.pop("_order", 0)
        return {**self.fn(item, **kw), "_order": order}


def _keep_order(fn):
    return _KeepOrder(fn)


# ---------------------------------------------------------------------------------------------------------
# Worker pools: long-lived workers (a model or a heavy import loaded once), one call per item.


class ActorPool:
    """Up to ``size`` Ray actors of ``worker_cls`` (built with no arguments; ``ready()`` and ``call(*args)``
    methods); each ``submit`` is one actor call. A worker that dies is replaced and the call raises.

    ``per_node=True``: ``size`` actors at most on each node of ``nodes`` (the alive nodes with ``num_cpus``
    CPUs or more when the pool starts, and again at ``refresh_nodes``; ids from ``ray.nodes()``), each
    pinned to its node (hard node affinity), ``n_start`` of them started on every node;
    ``submit(*args, node=id)`` runs the call on an idle actor of that node, creating one there when none is
    idle (the caller keeps each node within ``size`` calls in flight). A dead actor is replaced on the same
    node."""

    def __init__(self, worker_cls, size: int, num_cpus: float, ray_cfg: RayConfig | None = None,
                 n_start: int = 1, per_node: bool = False):
        import ray

        init_ray(ray_cfg)
        self.ray = ray
        have = float(ray.cluster_resources().get("CPU", 0.0))
        if num_cpus > have:
            raise RuntimeError(f"num_cpus {num_cpus:g} per worker; the Ray cluster has {have:g}")
        self.cls = ray.remote(num_cpus=num_cpus, max_restarts=0, max_task_retries=0)(worker_cls)
        self.opts = storage_runtime_env()
        self.size = size
        self.per_node = per_node
        self.num_cpus = num_cpus
        self.busy: dict = {}  # handle -> (actor, node)
        if per_node:
            self.nodes = self._alive_nodes()
            k = max(1, min(n_start, size))
            self.idle_on = {n: [self._new(n) for _ in range(k)] for n in self.nodes}
            self.count_on = {n: k for n in self.nodes}  # live actors per node
            starting = [a for actors in self.idle_on.values() for a in actors]
        else:
            self.nodes = [None]
            self.idle = [self._new() for _ in range(max(1, min(n_start, size)))]
            starting = self.idle
        # wait until they are up (or until a minute passed: those that fit start later, as resources free)
        ray.wait([a.ready.remote() for a in starting], num_returns=len(starting), timeout=60)

    def _alive_nodes(self) -> list:
        nodes = sorted(n["NodeID"] for n in self.ray.nodes() if n.get("Alive")
                       and float(n.get("Resources", {}).get("CPU", 0.0)) >= self.num_cpus)
        if not nodes:
            raise RuntimeError(f"num_cpus {self.num_cpus:g} per worker; no alive Ray node has that many CPUs")
        return nodes

    def refresh_nodes(self) -> list:
        """``per_node``: the alive nodes read again. A node that joined is added (its actors start at its
        first call); one that left is dropped with its idle actors (a call in flight there fails as a lost
        actor and is not replaced). Returns the nodes."""
        if not self.per_node:
            return self.nodes
        alive = self._alive_nodes()
        for n in alive:
            if n not in self.idle_on:
                self.idle_on[n], self.count_on[n] = [], 0
        for n in [n for n in self.idle_on if n not in alive]:
            for a in self.idle_on.pop(n):
                self.ray.kill(a)
            self.count_on.pop(n, None)
        self.nodes = alive
        return alive

    def _back(self, node, actor) -> None:
        """An actor done with its call goes back to its node's idle list (killed if its node was dropped)."""
        if self.per_node and node not in self.idle_on:
            self.ray.kill(actor)
        else:
            self._idle(node).append(actor)

    def _new(self, node=None):
        if node is None:
            return self.cls.options(**self.opts).remote()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        pin = NodeAffinitySchedulingStrategy(node, soft=False)
        return self.cls.options(**self.opts, scheduling_strategy=pin).remote()

    def submit(self, *args, node=None):
        if not self.per_node:
            actor = self.idle.pop() if self.idle else self._new()
        elif node not in self.idle_on:
            raise ValueError(f"node {node!r} is not one of this pool's nodes")
        elif self.idle_on[node]:
            actor = self.idle_on[node].pop()
        elif self.count_on[node] < self.size:
            actor = self._new(node)
            self.count_on[node] += 1
        else:
            raise RuntimeError(f"node {node}: all {self.size} workers are busy")
        h = actor.call.remote(*args)
        self.busy[h] = (actor, node)
        return h

    def _idle(self, node) -> list:
        return self.idle_on[node] if self.per_node else self.idle

    def wait(self, handles: list, timeout: float) -> list:
        done, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        if done:  # take everything else that is finished too
            more, _ = self.ray.wait(handles, num_returns=len(handles), timeout=0)
            done = list(dict.fromkeys(done + more))
        return done

    def result(self, h) -> Any:
        actor, node = self.busy.pop(h)
        try:
            out = self.ray.get(h)
        except self.ray.exceptions.RayActorError:
            self.ray.kill(actor)
            if not self.per_node or node in self.idle_on:  # replaced on its node, unless the node left
                self._idle(node).append(self._new(node))  # the item counts a try
            raise
        except Exception:
            self._back(node, actor)  # the call raised (a store write failed...): the actor is fine
            raise
        self._back(node, actor)
        return out

    def close(self):
        idle = [a for v in self.idle_on.values() for a in v] if self.per_node else self.idle
        for a in idle + [a for a, _ in self.busy.values()]:
            self.ray.kill(a)  # free their CPUs for the stages that follow
        if self.per_node:
            self.idle_on = {n: [] for n in self.nodes}
        else:
            self.idle = []
        self.busy = {}


class ThreadPool:
    """The same interface in this process: one ``worker_cls()`` shared by ``size`` threads. ``per_node``:
    one node, ``"local"`` (``submit(*args, node="local")``)."""

    def __init__(self, worker_cls, size: int, num_cpus: float = 0.0, ray_cfg: RayConfig | None = None,
                 n_start: int = 1, per_node: bool = False):
        self.worker = worker_cls()
        self.pool = cf.ThreadPoolExecutor(max_workers=size, thread_name_prefix=worker_cls.__name__)
        self.nodes = ["local"] if per_node else [None]

    def refresh_nodes(self) -> list:
        return self.nodes

    def submit(self, *args, node=None):
        if node not in self.nodes:
            raise ValueError(f"node {node!r} is not one of this pool's nodes {self.nodes}")
        return self.pool.submit(self.worker.call, *args)

    def wait(self, handles: list, timeout: float) -> list:
        done, _ = cf.wait(handles, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        return list(done)

    def result(self, h) -> Any:
        return h.result()

    def close(self):
        self.pool.shutdown(wait=True)


def worker_pool(runner: str, worker_cls, size: int, num_cpus: float, ray_cfg: RayConfig | None = None,
                n_start: int = 1, per_node: bool = False):
    """An ActorPool when ``runner == "ray"``, else a ThreadPool. ``per_node``: ``size`` workers on each
    node (``pool.nodes``), ``submit(*args, node=...)`` picks the node."""
    cls = ActorPool if runner == "ray" else ThreadPool
    return cls(worker_cls, size, num_cpus, ray_cfg, n_start, per_node)
