"""Runs a pipeline from pipelines.yaml: the per-video map groups streaming on Ray Data (or sequentially, same
semantics and the same files), each video committed by the worker that finishes it, then the global phase
(cross-video pairing and shard writing, ``curation.global_phase``) over the committed videos' tables.

One Ray row is one video (its clip rows travel together as JSON), so the worker that runs the last map
group holds every row of a video and commits it at once: a run killed at any moment loses only the videos
in flight. Each map group's output is cached under the hash of the stages up to and including it, so a
re-run resumes every video from the furthest group whose output is still valid (0 videos re-processed
after a change to the global stages; a changed ``caption`` re-runs from ``caption`` on and reuses the cut
group's clips). Outputs live in a ``curation.storage.Store`` (a local folder or ``s3://``): stages work on a
local scratch folder and the runner moves the files they name between it and the store."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from curation.config import Config, StageSpec, load_config
from curation.execute import init_ray
from curation.global_phase import STEPS, export_video, run_global, validate_step
from curation.manifest import GroupCache, Manifest, source_signature
from curation.models import record_unpinned
from curation.packs import unpack
from curation.stage import Record, Stage, StageContext, StageGroup
from curation.stages.registry import load_all, validate_stage_spec
from curation.storage import IO_THREADS, Store, is_uri, scratch_dir, set_cache_limit_gb

log = logging.getLogger(__name__)


class ResourceError(RuntimeError):
    """A stage group asks for more than the Ray cluster has; Ray would otherwise wait forever."""


class StageFailureError(RuntimeError):
    """Too many rows of one stage failed: the run stops with the first error instead of 'succeeding'."""


def validate_pipelines(cfg: Config) -> Config:
    """Check every map stage and global step of every pipeline against its params; ConfigError naming the key
    path."""
    for pname, specs in cfg.pipelines.items():
        for i, spec in enumerate(specs):
            path = f"pipelines.{pname}[{i}]"
            if spec.stage in STEPS:
                validate_step(spec, path)
            else:
                validate_stage_spec(spec, path)
    return cfg


def load_pipeline_config(path: str = "pipelines.yaml") -> Config:
    """``pipelines.yaml`` read safely, its schema checked, and every stage's params checked."""
    return validate_pipelines(load_config(path))


def build_stage(spec: StageSpec, ctx: StageContext) -> Stage:
    cls = load_all()[spec.stage]
    params = validate_stage_spec(spec, spec.stage)
    return cls(params=params, backend=dict(spec.backend), ctx=ctx)


def spec_identity(spec: StageSpec) -> dict:
    """What of a stage decides its output: name, group, params and backend (resources do not)."""
    return {"stage": spec.stage, "group": spec.group, "params": spec.params, "backend": spec.backend}


def chain_hash(specs: list[StageSpec], salt: str = "") -> str:
    blob = json.dumps([salt, *[spec_identity(s) for s in specs]], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class GroupPlan:
    """Consecutive map stages that run in one worker call, with the resources of the group. ``batch_size``
    counts videos; ``hash`` covers every stage up to and including this group."""

    name: str
    specs: list[StageSpec]
    uses_model: bool
    num_cpus: float
    num_gpus: float
    batch_size: int
    concurrency: int
    max_concurrency: int = 0
    hash: str = ""

    @property
    def pool(self) -> tuple[int, int]:
        """(min, max) actors of the group's pool."""
        return self.concurrency, max(self.concurrency, self.max_concurrency)


def plan(specs: list[StageSpec]) -> tuple[list[GroupPlan], list[StageSpec]]:
    """Split a pipeline into map groups (in order) and the trailing global steps (``global_phase.STEPS``)."""
    groups: list[GroupPlan] = []
    globals_: list[StageSpec] = []
    for spec in specs:
        if spec.stage in STEPS:
            globals_.append(spec)
            continue
        if globals_:
            raise ValueError(f"map stage {spec.stage!r} comes after a global step; put global steps last")
        # A stage may decide from its backend whether it holds a model (constructors only store config).
        uses_model = build_stage(spec, StageContext(out_dir="")).uses_model
        r = spec.resources
        if groups and spec.group and groups[-1].name == spec.group:
            g = groups[-1]
            g.specs.append(spec)
            g.uses_model |= uses_model
            g.num_cpus = max(g.num_cpus, r.num_cpus)
            g.num_gpus = max(g.num_gpus, r.num_gpus)
            g.batch_size = min(g.batch_size, r.batch_size)
            g.concurrency = max(g.concurrency, r.concurrency)
            g.max_concurrency = max(g.max_concurrency, r.max_concurrency)
        else:
            groups.append(GroupPlan(spec.group or spec.stage, [spec], uses_model, r.num_cpus,
                                    r.num_gpus, r.batch_size, r.concurrency, r.max_concurrency))
    done: list[StageSpec] = []
    for g in groups:
        done += g.specs
        g.hash = chain_hash(done)
    return groups, globals_


def map_hash(groups: list[GroupPlan]) -> str:
    return groups[-1].hash if groups else chain_hash([])


def build_group(g: GroupPlan, ctx: StageContext) -> StageGroup:
    return StageGroup([build_stage(s, ctx) for s in g.specs])


# ---------------------------------------------------------------------------------------------------------
# Files named in rows: moved between the local scratch folder (what stages read and write) and the store.

_FILE_KEYS = ("clip_path", "path")


def map_files(obj, fn):
    """``obj`` with ``fn`` applied to every relative file path it names (``clip_path``, ``path``,
    ``*_file``, at any depth); everything else is kept as it is."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(v, str) and (k in _FILE_KEYS or k.endswith("_file")):
                out[k] = fn(v) if v and not os.path.isabs(v) and not is_uri(v) else v
            else:
                out[k] = map_files(v, fn) if isinstance(v, (dict, list)) else v
        return out
    if isinstance(obj, list):
        return [map_files(v, fn) for v in obj]
    return obj


def files_of(obj) -> set[str]:
    """Relative file paths a row names (``clip_path``, ``path``, ``*_file``), at any depth."""
    out: set[str] = set()
    map_files(obj, lambda v: out.add(v) or v)
    return out


def with_refs(obj, refs: dict[str, str]):
    """``obj`` with every file path it names that ``refs`` maps replaced by its packed reference: committed
    rows name where the shard writer reads each clip and crop."""
    return map_files(obj, lambda v: refs.get(v, v))


@dataclass
class MapContext:
    """What every map worker needs: the groups, the store and its local scratch folder."""

    groups: list[GroupPlan]
    store_uri: str
    models_dir: str
    max_fail_frac: float = 0.5
    min_fail_rows: int = 20
    cache_max_gb: float | None = None  # the download cache's cap on every worker (None: the env's or default)

    @property
    def store(self) -> Store:
        return Store(self.store_uri)

    def stage_ctx(self) -> StageContext:
        return StageContext(out_dir=scratch_dir(self.store), models_dir=self.models_dir,
                            config_hash=map_hash(self.groups))


# Calls a model group's actor holds at once: one on the models, one fetching or uploading. A call is a
# bundle of blocks (run.videos_per_block videos) whose batches run one after another, so what overlaps is
# one block's store I/O with another block's model work, batch by batch.
ACTOR_CALLS = 2


class VideoWorker:
    """Runs one map group over a batch of videos (one item per video: ``{video_id, start, sig, rows}``).
    Items already finished (``status`` set) or resuming after this group pass through. The last group
    commits each video (its files to the store, its tables, then its manifest record) and returns a small
    status item in its place."""

    def __init__(self, index: int, mc: MapContext):
        self.index, self.mc = index, mc
        self.plan = mc.groups[index]
        self.last = index == len(mc.groups) - 1
        self.ctx = mc.stage_ctx()
        self.store = mc.store
        self.group = build_group(self.plan, self.ctx)
        self._ready = False
        self.unpinned: set[str] = set()  # model files this group's stages loaded under `sha256: unpinned`
        self._io: cf.ThreadPoolExecutor | None = None
        self._model_lock = threading.Lock()
        self._io_lock = threading.Lock()

    def _parallel(self, fn, items) -> list:
        """``fn`` over ``items`` on the worker's I/O threads (store round trips overlap instead of queueing
        one after another on a model worker); the results in order, the first error raised once all ran."""
        items = list(items)
        if len(items) < 2:
            return [fn(x) for x in items]
        with self._io_lock:
            if self._io is None:
                self._io = cf.ThreadPoolExecutor(IO_THREADS, thread_name_prefix="store-io")
        futures = [self._io.submit(fn, x) for x in items]
        cf.wait(futures)
        return [f.result() for f in futures]

    def setup(self) -> None:
        if not self._ready:
            if self.mc.cache_max_gb is not None:  # on whichever node this worker runs
                set_cache_limit_gb(self.mc.cache_max_gb)
            with record_unpinned() as seen:
                self.group.setup()
            self.unpinned |= seen
            self._ready = True

    def __call__(self, items: list[dict]) -> list[dict]:
        self.setup()
        todo = [it for it in items if "status" not in it and it["start"] <= self.index]
        if not todo:
            return items
        before = {it["video_id"]: files_of(it["rows"]) for it in todo}
        fetched = self._fetch(todo, before)
        rows = [r for it in todo for r in it["rows"]]
        # One batch at a time on the models; another batch's fetches and uploads (the actor runs two calls at
        # once, ACTOR_CALLS) overlap this one's model work instead of leaving the GPU idle.
        with self._model_lock:
            with record_unpinned() as seen:  # a backend may load its model on first use
                out = self.group(rows)
            self.unpinned |= seen
            group_counts = dict(self.group.counts)
        if self.unpinned:  # each row names the model files that ran unpinned on it (tables, shards, summary)
            out = [{**r, "unpinned_models": sorted(self.unpinned.union(r.get("unpinned_models") or ()))}
                   for r in out]
        by_video: dict[str, list[Record]] = {it["video_id"]: [] for it in todo}
        for r in out:
            by_video.setdefault(r["video_id"], []).append(r)
        counts = dict(todo[0].get("stage_counts") or {})
        for name, (n_in, n_failed, err) in group_counts.items():
            c = counts.get(name, [0, 0, None])
            counts[name] = [c[0] + n_in, c[1] + n_failed, c[2] or err]
        todo[0]["stage_counts"] = counts
        done: dict[str, dict] = dict(zip([it["video_id"] for it in todo],
                                         self._parallel(lambda it: self._leave(it, by_video, before, fetched),
                                                        todo)))
        return [done.get(it["video_id"], it) if "status" not in it else it for it in items]

    def _leave(self, it: dict, by_video: dict, before: dict, fetched: dict) -> dict:
        """One video leaves the group: its new files and rows go to the store as one pack (saved for the next
        group, or committed), and none of its local files is kept (the next group, on whichever node it
        runs, fetches the pack). A store failure is this video's (``store:error``), not the batch's."""
        vid, local = it["video_id"], self.ctx.out_dir
        vrows = [_restore_video_path(r) for r in by_video[vid]]
        downloaded, refs = fetched[vid]
        new_files = files_of(vrows) - before[vid]
        try:
            made = [rel for rel in sorted(new_files) if os.path.exists(os.path.join(local, rel))]
            # on a local store the files already sit in the output folder: the pack holds the rows only
            files = {} if self.store.is_local else {rel: os.path.join(local, rel) for rel in made}
            packs = list(it.get("packs") or [])
            save = functools.partial(GroupCache(self.store).save, self.plan.name, self.plan.hash, vid)
            if self.last:
                if files:  # the last group's files, packed, for the shard writer (its rows: the manifest)
                    _, own = save([], it["sig"], files, packs, local)
                    refs = {**refs, **own}
                out = self._commit(it, with_refs(vrows, refs) if refs else vrows)
            else:
                rel, _ = save(vrows, it["sig"], files, packs, local)
                out = {**it, "rows": vrows, "packs": packs + [rel] if files else packs}
        except Exception as e:  # the store failed for this video: report it, keep the batch going
            log.warning("video %s: could not save its outputs: %s", vid, e)
            out = {"video_id": vid, "status": "failed", "reason": "store:error", "error": str(e),
                   "summary": {"n_clips": 0, "n_ok": 0, "reasons": {"store:error": 1}},
                   "stage_counts": it.get("stage_counts"), "state": "processed", **unpinned_of(vrows)}
        if not self.store.is_local:
            _remove_local(local, before[vid] | files_of(vrows))
        _remove_files(downloaded)
        if "spans_skipped" in it:
            out["spans_skipped"] = it["spans_skipped"]
        return out

    def _fetch(self, todo: list[dict], rels: dict[str, set[str]]) -> dict[str, tuple[list[str], dict]]:
        """Make the files each video's rows name available locally (each earlier group's pack downloaded
        once, the named members unpacked), and its source video when a stage of this group reads it
        (``Stage.reads_source_video``); the batch's packs, then its source videos, on the I/O threads. Per
        video: the local copies of source videos it downloaded (removed once the video leaves the group) and
        member -> packed reference of the earlier packs."""
        refs: dict[str, dict[str, str]] = {it["video_id"]: {} for it in todo}
        if not self.store.is_local:
            jobs = [(it["video_id"], p) for it in todo for p in it.get("packs") or ()]
            got = self._parallel(lambda j: unpack(self.store, j[1], rels[j[0]], self.ctx.out_dir), jobs)
            for (vid, _), members in zip(jobs, got):
                refs[vid].update(members)
        sources = self._parallel(self._source_video, todo)
        return {it["video_id"]: (src, refs[it["video_id"]]) for it, src in zip(todo, sources)}

    def _source_video(self, it: dict) -> list[str]:
        ok = [r for r in it["rows"] if r.get("status", "ok") == "ok"]
        if not any(s.reads_source_video(r) for s in self.group.stages for r in ok):
            return []
        got: dict[str, str] = {}
        for i, r in enumerate(it["rows"]):
            p = r.get("video_path")
            if isinstance(p, str) and is_uri(p):
                if p not in got:
                    d, name = p.rsplit("/", 1)
                    got[p] = Store(d).local_path(name)
                # a new row: the caller's source row (the sequential runner hands it over) keeps its URI
                it["rows"][i] = {**r, "video_uri": p, "video_path": got[p]}
        return sorted(set(got.values()))

    def _commit(self, it: dict, rows: list[Record]) -> dict:
        mh = self.plan.hash
        export_video(rows, self.store, self.ctx.out_dir, mh)
        rec = Manifest(self.store).commit(it["video_id"], rows, mh, source_sig=it["sig"])
        return {"video_id": it["video_id"], "status": rec["status"], "reason": rec["reason"],
                "summary": rec["summary"], "stage_counts": it.get("stage_counts"), "state": "processed",
                **unpinned_of(rows)}


def unpinned_of(rows: list[Record]) -> dict:
    """``{"unpinned_models": [...]}``: the model files that ran unpinned on any of the rows; {} when none."""
    files = sorted({f for r in rows for f in r.get("unpinned_models") or ()})
    return {"unpinned_models": files} if files else {}


def _restore_video_path(r: Record) -> Record:
    if "video_uri" in r:
        r = dict(r)
        r["video_path"] = r.pop("video_uri")
    return r


def _remove_local(root: str, rels: set[str]) -> None:
    _remove_files(os.path.join(root, rel) for rel in sorted(rels))


def _remove_files(paths: Iterable[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except OSError:
            pass


def resume_item(row: Record, mc: MapContext) -> dict:
    """A source row -> the item the map groups receive: finished already (status item), resumed after the
    furthest group whose cached output is valid, or from the start. Rejected source rows (missing file,
    bad CSV row) are committed here: they need no work. Every item carries ``spans_skipped`` (reason ->
    count) when the source took spans out before any decode (Panda's ``keep_labels``). The manifest is
    looked up per row by the worker that holds the row (the anti-join of source and manifest, in Ray)."""
    item = _resume_item(row, mc)
    skipped = Counter(s.get("reason") or "?" for s in row.get("skipped_spans") or ())
    if skipped:
        item["spans_skipped"] = dict(sorted(skipped.items()))
    return item


def _resume_item(row: Record, mc: MapContext) -> dict:
    store, vid = mc.store, row["video_id"]
    sig = source_signature(row)
    mh = map_hash(mc.groups)
    manifest = Manifest(store)
    rec = manifest.load(vid)
    if rec is not None and rec.get("config_hash") == mh and rec.get("status") != "failed" \
            and rec.get("source_sig", sig) == sig:
        return {"video_id": vid, "status": rec["status"], "reason": rec.get("reason"),
                "summary": rec.get("summary") or {}, "state": "skipped", **unpinned_of(rec.get("rows") or [])}
    if row.get("status", "ok") != "ok" or not mc.groups:
        rec = manifest.commit(vid, [row], mh, source_sig=sig)
        return {"video_id": vid, "status": rec["status"], "reason": rec["reason"], "summary": rec["summary"],
                "state": "processed"}
    cache = GroupCache(store)
    for gi in range(len(mc.groups) - 2, -1, -1):
        g = mc.groups[gi]
        got = cache.load(g.name, g.hash, vid, sig)
        if got is not None:
            return {"video_id": vid, "start": gi + 1, "sig": sig, "rows": got["rows"], "packs": got["packs"],
                    "resumed_from": g.name}
    return {"video_id": vid, "start": 0, "sig": sig, "rows": [row]}


# ---------------------------------------------------------------------------------------------------------
# Sequential runner: the same workers, one video at a time, in this process. Used by tests and debugging.


def run_sequential(source: Iterable[Record], mc: MapContext) -> Iterator[dict]:
    workers = [VideoWorker(i, mc) for i in range(len(mc.groups))]
    for row in source:
        items = [resume_item(row, mc)]
        for w in workers:
            items = w(items)
        yield from items


# ---------------------------------------------------------------------------------------------------------
# Ray Data runner. Items cross operator boundaries as JSON text so nested records never fight Arrow schemas.


def _items_from_batch(batch) -> list[dict]:
    return [json.loads(s) for s in batch["item"]]


def _batch_from_items(items: list[dict]):
    import pandas as pd

    return pd.DataFrame({"video_id": [it["video_id"] for it in items],
                         "item": [json.dumps(it) for it in items]})


class _GroupActor:
    """Actor-pool wrapper: loads the group's models once per actor."""

    def __init__(self, index: int, mc: MapContext):
        self.worker = VideoWorker(index, mc)
        self.worker.setup()

    def __call__(self, batch):
        return _batch_from_items(self.worker(_items_from_batch(batch)))


_TASK_WORKERS: dict[tuple, VideoWorker] = {}


def _group_task(batch, index: int, mc: MapContext):
    # Plain tasks reuse a per-process worker so stateless stages are not rebuilt for every batch.
    key = (index, mc.store_uri, map_hash(mc.groups))
    if key not in _TASK_WORKERS:
        _TASK_WORKERS[key] = VideoWorker(index, mc)
    return _batch_from_items(_TASK_WORKERS[key](_items_from_batch(batch)))


def _resume_task(batch, mc: MapContext):
    import pandas as pd

    items = [resume_item(json.loads(s), mc) for s in batch["rec"]]
    return pd.DataFrame({"video_id": [it["video_id"] for it in items],
                         "item": [json.dumps(it) for it in items]})


def _no_fusion() -> dict:
    # A ray_remote_args_fn keeps Ray Data from fusing a CPU task group into the next group's actor pool,
    # where it would run at the pool's (GPU) concurrency instead of on every free CPU.
    return {}


def node_resources() -> list[dict]:
    """The resources of each alive node of the connected Ray cluster."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def check_resources(groups: list[GroupPlan], cluster: dict, nodes: list[dict] | None = None) -> None:
    """Each worker must fit on the cluster and on one of its ``nodes`` (Ray places a worker's CPUs and GPUs
    on one node: two 1-CPU nodes never run a 2-CPU worker, and Ray Data's read tasks need 1 CPU on one node),
    and so must every actor pool at its minimum size at once (a streaming run keeps them all alive), with
    room left for one task of each CPU group."""
    for g in groups:
        for what, need in (("CPU", g.num_cpus), ("GPU", g.num_gpus)):
            have = float(cluster.get(what, 0.0))
            if need > have:
                raise ResourceError(
                    f"stage group {g.name!r} asks for {need:g} {what} per worker but the Ray cluster has "
                    f"{have:g}; lower resources.num_{what.lower()}s in pipelines.yaml or use a cluster "
                    f"that has them (RAY_ADDRESS)")
    if nodes is not None:
        _check_nodes(groups, nodes)
    for what in ("CPU", "GPU"):
        key = "num_cpus" if what == "CPU" else "num_gpus"
        pools = [(g.name, g.pool[0], getattr(g, key)) for g in groups if g.uses_model and getattr(g, key)]
        tasks = max([getattr(g, key) for g in groups if not g.uses_model] or [0.0])
        need = sum(n * r for _, n, r in pools) + tasks
        have = float(cluster.get(what, 0.0))
        if pools and need > have + 1e-9:
            parts = " + ".join(f"{name} {n} x {r:g}" for name, n, r in pools)
            raise ResourceError(
                f"the actor pools need {need:g} {what} at their minimum sizes ({parts}"
                f"{f' + {tasks:g} for one CPU task' if tasks else ''}) but the Ray cluster has {have:g}; "
                f"lower resources.concurrency or resources.num_{what.lower()}s in pipelines.yaml")


def _check_nodes(groups: list[GroupPlan], nodes: list[dict]) -> None:
    def fits(cpu: float, gpu: float) -> bool:
        return any(float(n.get("CPU", 0.0)) >= cpu - 1e-9 and float(n.get("GPU", 0.0)) >= gpu - 1e-9
                   for n in nodes)

    sizes = ", ".join(sorted({f"{n.get('CPU', 0.0):g} CPU / {n.get('GPU', 0.0):g} GPU" for n in nodes}))
    if not fits(1.0, 0.0):
        raise ResourceError(f"no Ray node has 1 CPU (nodes: {sizes or 'none'}); Ray Data's read tasks "
                            f"need 1 CPU on one node")
    for g in groups:
        if not fits(g.num_cpus, g.num_gpus):
            raise ResourceError(
                f"stage group {g.name!r} asks for {g.num_cpus:g} CPU and {g.num_gpus:g} GPU per worker "
                f"but no Ray node has that much (nodes: {sizes}); a worker runs on one node: lower "
                f"resources.num_cpus/num_gpus in pipelines.yaml or add larger nodes")


def run_ray(ds, mc: MapContext, cfg: Config) -> Iterator[dict]:
    """The map groups over ``ds``, the source as a Ray Dataset of ``video_id`` / ``rec`` (record JSON) rows
    (``curation.ingest``); yields each video's status item as it finishes."""
    import ray
    from ray.data import ActorPoolStrategy

    init_ray(cfg.ray)
    check_resources(mc.groups, ray.cluster_resources(), node_resources())
    if ds is None:
        return
    # The source arrives in blocks of run.videos_per_block videos (curation.ingest repartitions its read):
    # a group task passes a block's videos to the next group when it has done them all (each video still
    # commits as soon as its last group is done), and the blocks in flight are what keeps every worker of
    # a pool fed.
    ds = ds.map_batches(_resume_task, fn_kwargs={"mc": mc}, batch_size=1, batch_format="pandas",
                        num_cpus=0.1)
    for i, g in enumerate(mc.groups):
        common = dict(batch_size=g.batch_size, batch_format="pandas", num_cpus=g.num_cpus)
        if g.num_gpus:
            common["num_gpus"] = g.num_gpus
        if g.uses_model:
            lo, hi = g.pool
            pool = ActorPoolStrategy(min_size=lo, max_size=hi, max_concurrent_calls_per_actor=ACTOR_CALLS,
                                     enable_true_multi_threading=True)  # the worker's lock: one on the models
            ds = ds.map_batches(_GroupActor, fn_constructor_kwargs={"index": i, "mc": mc}, compute=pool,
                                **common)
        else:
            ds = ds.map_batches(_group_task, fn_kwargs={"index": i, "mc": mc},
                                ray_remote_args_fn=_no_fusion, **common)
    for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
        yield from _items_from_batch(batch)


# ---------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    videos_in: int
    videos_skipped: int
    videos_committed: int
    wall_s: float
    map_hash: str = ""
    totals: dict = field(default_factory=dict)  # clips, clips_ok, reasons, videos_with_clips, ...
    stage_counts: dict = field(default_factory=dict)  # stage -> [rows in, rows failed, first error]
    global_summary: dict = field(default_factory=dict)  # what the global phase returned
    map_wall_s: float = 0.0
    global_wall_s: float = 0.0
    store_uri: str = ""
    unpinned_model_files: list[str] = field(default_factory=list)  # ran under `sha256: unpinned`, any worker
    source: dict = field(default_factory=dict)  # the Ray ingest: parts, parts_written/_reused, dup_ids

    @property
    def rows(self) -> list[Record]:
        """Every committed row of this map config (loads the manifest: tests and small runs only)."""
        return Manifest(Store(self.store_uri)).rows(self.map_hash)


class _Totals:
    def __init__(self):
        self.reasons: Counter = Counter()
        self.n = Counter()
        self.filters_off: set[str] = set()
        self.stage_counts: dict[str, list] = {}
        self.unpinned: set[str] = set()
        self.spans_skipped: Counter = Counter()  # spans the source took out before any decode, by reason
        self.failed_reasons: Counter = Counter()  # videos whose status is `failed` (retried by a rerun)
        self.failed_ids: list[str] = []  # the FAILED_IDS_SHOWN smallest of their ids (any runner's order)

    FAILED_IDS_SHOWN = 20

    def add(self, item: dict) -> None:
        self.spans_skipped.update(item.get("spans_skipped") or {})
        s = item.get("summary") or {}
        self.n["videos"] += 1
        if item.get("status") == "failed":  # an error (store, stage exception), not a rejection
            self.n["videos_failed"] += 1
            self.failed_reasons[item.get("reason") or "?"] += 1
            self.failed_ids = sorted([*self.failed_ids, str(item["video_id"])])[: self.FAILED_IDS_SHOWN]
        self.n["clips"] += s.get("n_clips", 0)
        self.n["clips_ok"] += s.get("n_ok", 0)
        self.n["videos_with_clips"] += bool(s.get("n_clips"))
        self.reasons.update(s.get("reasons") or {})
        self.filters_off.update(s.get("filters_off") or [])
        self.unpinned.update(item.get("unpinned_models") or [])
        for name, (n_in, n_failed, err) in (item.get("stage_counts") or {}).items():
            c = self.stage_counts.setdefault(name, [0, 0, None])
            c[0] += n_in
            c[1] += n_failed
            c[2] = c[2] or err

    def check(self, max_frac: float, min_rows: int) -> None:
        for name, (n_in, n_failed, err) in self.stage_counts.items():
            if n_in >= min_rows and n_failed > max_frac * n_in:
                raise StageFailureError(
                    f"stage {name!r}: {n_failed} of {n_in} rows failed (more than {max_frac:.0%}); "
                    f"stopping the run. First error: {err}")

    def as_dict(self) -> dict:
        n = self.n
        return {**dict(n), "videos_failed": n["videos_failed"],
                "videos_rejected": n["videos"] - n["videos_with_clips"] - n["videos_failed"],
                "failed_by_reason": dict(sorted(self.failed_reasons.items())),
                "failed_video_ids": list(self.failed_ids),
                "reasons": dict(self.reasons.most_common()), "filters_off": sorted(self.filters_off),
                "spans_skipped": sum(self.spans_skipped.values()),
                "spans_skipped_by_reason": dict(self.spans_skipped.most_common())}


def run_pipeline(cfg: Config, pipeline: str, source_rows: Iterable[Record], ctx: StageContext,
                 runner: str = "ray", progress: Callable[[dict], None] | None = None,
                 out: str | None = None) -> RunResult:
    """Curate ``source_rows`` (any iterable, consumed once) into ``out`` (default ``ctx.out_dir``; a
    local folder or a URI). ``progress`` gets each finished video's status item as it arrives."""
    t0 = time.time()
    if runner not in ("ray", "sequential"):
        raise ValueError(f"runner must be 'ray' or 'sequential', not {runner!r}")
    store = Store(out or ctx.out_dir)
    specs = cfg.pipelines[pipeline]
    groups, global_specs = plan(specs)
    run_cfg = cfg.run
    set_cache_limit_gb(run_cfg.cache_max_gb)  # here; each map worker sets it in setup (MapContext)
    mc = MapContext(groups, store.uri, ctx.models_dir, run_cfg.max_fail_frac, run_cfg.min_fail_rows,
                    run_cfg.cache_max_gb)
    mh = map_hash(groups)
    totals = _Totals()
    committed = skipped = 0
    ingest: dict = {}
    parts = None
    if runner == "ray":
        import ray

        from curation.ingest import block_rows, ensure_csv_parts, panda_dataset, read_parts, write_row_parts

        init_ray(cfg.ray)
        check_resources(groups, ray.cluster_resources(), node_resources())
        src = getattr(source_rows, "ingest", None)
        if src is not None:  # a Panda-70M CSV: converted into parts by Ray tasks, keyed by its digest
            parts = ensure_csv_parts(src, store, run_cfg.source_part_rows)
            ds = panda_dataset(src, parts, store, block_rows(parts, run_cfg.videos_per_block,
                                                             run_cfg.max_source_blocks))
        else:
            parts = write_row_parts(source_rows, store, run_cfg.videos_per_part)
            rpb = block_rows(parts, run_cfg.videos_per_block, run_cfg.max_source_blocks)
            ds = read_parts(parts.paths, store, rpb) if parts.paths else None
        ingest = parts.as_dict()
        stream = run_ray(ds, mc, cfg)
    else:
        counted: list[int] = [0]

        def counting(rows):
            seen: set[str] = set()
            for r in rows:
                if r["video_id"] in seen:
                    raise ValueError(f"duplicate video_id {r['video_id']!r} from the source")
                seen.add(r["video_id"])
                counted[0] += 1
                yield r

        stream = run_sequential(counting(source_rows), mc)
    try:
        for item in stream:
            totals.add(item)
            if item.get("state") == "skipped":
                skipped += 1
            else:
                committed += 1
                if progress:
                    progress(item)
            totals.check(mc.max_fail_frac, mc.min_fail_rows)
    finally:
        if parts is not None:
            from curation.ingest import remove_parts

            remove_parts(store, parts)
    n_in = totals.n["videos"] if runner == "ray" else counted[0]
    t_map = time.time() - t0

    global_summary: dict = {}
    if global_specs:
        gctx = StageContext(out_dir=scratch_dir(store), models_dir=ctx.models_dir, config_hash=mh)
        if runner == "ray":
            init_ray(cfg.ray)
        global_summary = run_global(global_specs, store, gctx, mh, runner=runner)
    return RunResult(n_in, skipped, committed, time.time() - t0, mh, totals.as_dict(), totals.stage_counts,
                     global_summary, t_map, time.time() - t0 - t_map, store.uri, sorted(totals.unpinned),
                     ingest)


def replace_stage_params(cfg: Config, pipeline: str, stage: str, **params) -> Config:
    """A copy of ``cfg`` with ``params`` set on ``stage`` of ``pipeline`` (tests and benches)."""
    new = dataclasses.replace(cfg, pipelines=dict(cfg.pipelines))
    new.pipelines[pipeline] = [
        dataclasses.replace(s, params={**s.params, **params}) if s.stage == stage else s
        for s in cfg.pipelines[pipeline]
    ]
    return new
