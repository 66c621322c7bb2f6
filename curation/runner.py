"""Runs a pipeline from pipelines.yaml: the per-video stages on Ray Data (or sequentially, same semantics),
each finished video committed to the manifest, then the global stages over every committed row."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from curation.config import Config, StageSpec, validate_stage_spec
from curation.manifest import Manifest
from curation.stage import Record, Stage, StageContext, StageGroup

log = logging.getLogger(__name__)


def build_stage(spec: StageSpec, ctx: StageContext) -> Stage:
    from curation.stages import load_all

    cls = load_all()[spec.stage]
    params = validate_stage_spec(spec, spec.stage)
    return cls(params=params, backend=dict(spec.backend), ctx=ctx)


@dataclass
class GroupPlan:
    """Consecutive map stages that run in one worker call, with the resources of the group."""

    name: str
    specs: list[StageSpec]
    uses_model: bool
    num_cpus: float
    num_gpus: float
    batch_size: int
    concurrency: int


def plan(specs: list[StageSpec]) -> tuple[list[GroupPlan], list[StageSpec]]:
    """Split a pipeline into map groups (in order) and the trailing global stages."""
    from curation.stages import load_all

    stages = load_all()
    groups: list[GroupPlan] = []
    globals_: list[StageSpec] = []
    for spec in specs:
        cls = stages[spec.stage]
        if cls.kind == "global":
            globals_.append(spec)
            continue
        if globals_:
            raise ValueError(f"map stage {spec.stage!r} comes after a global stage; put global stages last")
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
        else:
            groups.append(GroupPlan(spec.group or spec.stage, [spec], uses_model, r.num_cpus,
                                    r.num_gpus, r.batch_size, r.concurrency))
    return groups, globals_


def build_group(g: GroupPlan, ctx: StageContext) -> StageGroup:
    return StageGroup([build_stage(s, ctx) for s in g.specs])


class VideoCollector:
    """Gathers the rows of each video as they stream in and commits a video once all of its rows
    (``video_n_rows``) have arrived."""

    def __init__(self, manifest: Manifest, config_hash: str, on_commit: Callable[[dict], None] | None = None):
        self.manifest, self.config_hash, self.on_commit = manifest, config_hash, on_commit
        self.pending: dict[str, list[Record]] = defaultdict(list)
        self.committed = 0

    def add(self, row: Record) -> None:
        vid = row["video_id"]
        self.pending[vid].append(row)
        if len(self.pending[vid]) >= int(row.get("video_n_rows") or 1):
            self._commit(vid)

    def _commit(self, vid: str) -> None:
        rec = self.manifest.commit(vid, self.pending.pop(vid), self.config_hash)
        self.committed += 1
        if self.on_commit:
            self.on_commit(rec)

    def flush(self) -> int:
        """Commit videos whose rows did not all arrive (a stage dropped rows); returns how many."""
        n = len(self.pending)
        for vid in list(self.pending):
            log.warning("video %s: %d rows arrived, fewer than announced", vid, len(self.pending[vid]))
            self._commit(vid)
        return n


# ---------------------------------------------------------------------------------------------------------
# Sequential runner: the same groups, the same batching, no Ray. Used by tests and for debugging.


def _batches(rows: list[Record], size: int) -> Iterator[list[Record]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def run_sequential(rows: list[Record], groups: list[GroupPlan], ctx: StageContext) -> Iterator[Record]:
    built = [build_group(g, ctx) for g in groups]
    for video in rows:
        out = [video]
        for g, bg in zip(groups, built):
            out = [r for b in _batches(out, g.batch_size) for r in bg(b)]
        yield from out


# ---------------------------------------------------------------------------------------------------------
# Ray Data runner. Rows cross operator boundaries as JSON text so nested records never fight Arrow schemas.


def _rows_from_batch(batch) -> list[Record]:
    return [json.loads(s) for s in batch["rec"]]


def _batch_from_rows(rows: list[Record]):
    import pandas as pd

    return pd.DataFrame({"video_id": [r["video_id"] for r in rows], "rec": [json.dumps(r) for r in rows]})


class _GroupActor:
    """Actor-pool wrapper: builds the group and loads its models once per actor."""

    def __init__(self, group: GroupPlan, ctx: StageContext):
        self.group = build_group(group, ctx)
        self.group.setup()

    def __call__(self, batch):
        return _batch_from_rows(self.group(_rows_from_batch(batch)))


_TASK_GROUPS: dict[tuple, StageGroup] = {}


def _group_task(batch, group: GroupPlan, ctx: StageContext):
    # Plain tasks reuse a per-process group so stateless stages are not rebuilt for every batch.
    key = (group.name, ctx.out_dir, ctx.config_hash)
    if key not in _TASK_GROUPS:
        _TASK_GROUPS[key] = build_group(group, ctx)
    return _batch_from_rows(_TASK_GROUPS[key](_rows_from_batch(batch)))


def init_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        num_cpus=cfg.ray.num_cpus,
        include_dashboard=cfg.ray.dashboard,
        dashboard_host=cfg.ray.dashboard_host,
        _node_ip_address=cfg.ray.node_ip,
        log_to_driver=True,
        configure_logging=False,
    )


class ResourceError(RuntimeError):
    """A stage group asks for more than the Ray cluster has; Ray would otherwise wait forever."""


def check_resources(groups: list[GroupPlan], cluster: dict) -> None:
    for g in groups:
        for what, need in (("CPU", g.num_cpus), ("GPU", g.num_gpus)):
            have = float(cluster.get(what, 0.0))
            if need > have:
                raise ResourceError(
                    f"stage group {g.name!r} asks for {need:g} {what} per worker but the Ray cluster has "
                    f"{have:g}; lower resources.num_{what.lower()}s in pipelines.yaml or use a cluster "
                    f"that has them (RAY_ADDRESS)")


def run_ray(rows: list[Record], groups: list[GroupPlan], ctx: StageContext, cfg: Config) -> Iterator[Record]:
    import ray
    from ray.data import ActorPoolStrategy

    init_ray(cfg)
    check_resources(groups, ray.cluster_resources())
    if not rows:
        return
    ds = ray.data.from_items([{"video_id": r["video_id"], "rec": json.dumps(r)} for r in rows],
                             override_num_blocks=max(1, min(len(rows), 64)))
    for g in groups:
        common = dict(batch_size=g.batch_size, batch_format="pandas", num_cpus=g.num_cpus)
        if g.num_gpus:
            common["num_gpus"] = g.num_gpus
        if g.uses_model:
            ds = ds.map_batches(_GroupActor, fn_constructor_kwargs={"group": g, "ctx": ctx},
                                compute=ActorPoolStrategy(size=g.concurrency), **common)
        else:
            ds = ds.map_batches(_group_task, fn_kwargs={"group": g, "ctx": ctx}, **common)
    for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
        yield from _rows_from_batch(batch)


# ---------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    videos_in: int
    videos_skipped: int
    videos_committed: int
    rows: list[Record]  # every committed row of this config (this run and earlier ones)
    outputs: list[Record]  # what the global stages returned (one row per written sample)
    wall_s: float


def run_pipeline(cfg: Config, pipeline: str, source_rows: list[Record], ctx: StageContext,
                 runner: str = "ray", progress: Callable[[dict], None] | None = None) -> RunResult:
    t0 = time.time()
    specs = cfg.pipelines[pipeline]
    groups, global_specs = plan(specs)
    manifest = Manifest(ctx.out_dir)
    collector = VideoCollector(manifest, ctx.config_hash, progress)

    todo: list[Record] = []
    skipped = 0
    seen: set[str] = set()
    for r in source_rows:
        if r["video_id"] in seen:
            raise ValueError(f"duplicate video_id {r['video_id']!r} from the source")
        seen.add(r["video_id"])
        if manifest.is_done(r["video_id"], ctx.config_hash):
            skipped += 1
        elif r.get("status", "ok") != "ok":
            collector.add(r)  # rejected by the source (missing video, bad CSV row): record it, no work
        else:
            todo.append(r)

    stream: Iterable[Record]
    if runner == "ray":
        stream = run_ray(todo, groups, ctx, cfg)
    elif runner == "sequential":
        stream = run_sequential(todo, groups, ctx)
    else:
        raise ValueError(f"runner must be 'ray' or 'sequential', not {runner!r}")
    for row in stream:
        collector.add(row)
    collector.flush()

    rows = manifest.rows(ctx.config_hash)
    live = [r for r in rows if r["video_id"] in seen]
    # Global stages see every ok row at once; the rows each returns are its outputs (a failure here is a
    # failure of the run, reported as such, since it concerns the whole dataset rather than one video).
    outputs: list[Record] = [r for r in live if r.get("status", "ok") == "ok"]
    for spec in global_specs:
        stage = build_stage(spec, ctx)
        stage.ensure_setup()
        outputs = stage.process(outputs)
    if not global_specs:
        outputs = []
    return RunResult(len(source_rows), skipped, collector.committed, live, outputs, time.time() - t0)
