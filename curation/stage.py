"""The stage interface, the stage and backend registries, and the record conventions every stage follows.

A *record* is one row flowing through the pipeline: a plain JSON-serialisable dict. Conventions:

- identity: ``video_id`` (source video), ``clip_id`` (None until the cut stage fans a video out into clips);
- ``status``: ``"ok"``, ``"rejected"`` (with ``reason``, a short snake_case code such as
  ``"quality:too_dark"``) or ``"failed"`` (with ``error``, the exception text). Only ``ok`` rows are
  processed by later stages; the others pass through untouched so every rejection is counted;
- filters add ``<stage>_score`` / ``<stage>_pass`` columns instead of silently dropping rows;
- keys starting with ``_`` are *transient* (decoded frames, tensors): they live only inside one stage
  group (one worker call), are never serialised, and are dropped at the group's end;
- ``video_n_rows``: how many rows the video fanned out into (set by a fan-out stage), so the manifest
  knows when every row of a video has arrived.

A stage: ``__init__(params, backend_cfg, ctx)`` only stores config (it runs on the driver); ``setup()``
loads models once inside the worker; ``process(rows) -> rows`` does the work on ``ok`` rows and may change
the number of rows. ``__call__`` wraps ``process`` so that an exception in one row marks that row
``failed`` instead of crashing the run.
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from collections.abc import Callable
from typing import Any, ClassVar

log = logging.getLogger(__name__)

Record = dict[str, Any]

STAGES: dict[str, type[Stage]] = {}
BACKENDS: dict[tuple[str, str], Callable[..., Any]] = {}


def register_stage(name: str):
    """Class decorator: make a Stage subclass available to pipelines.yaml under ``name``."""

    def deco(cls):
        if name in STAGES and STAGES[name] is not cls:
            raise ValueError(f"stage {name!r} registered twice")
        cls.name = name
        STAGES[name] = cls
        return cls

    return deco


def register_backend(capability: str, name: str):
    """Decorator: register a backend factory (class or function) for ``capability`` under ``name``."""

    def deco(factory):
        BACKENDS[(capability, name)] = factory
        return factory

    return deco


def backend_names(capability: str) -> list[str]:
    return sorted(n for (c, n) in BACKENDS if c == capability)


def build_backend(capability: str, name: str, **kwargs):
    """Instantiate a registered backend, with an error that lists what exists."""
    try:
        factory = BACKENDS[(capability, name)]
    except KeyError:
        raise ValueError(
            f"unknown {capability} backend {name!r}; registered: {backend_names(capability)}"
        ) from None
    # Keys that only tell `make weights` where a model comes from are not the backend's business.
    kwargs = {k: v for k, v in kwargs.items()
              if k not in _FETCH_KEYS and not k.endswith("_hub_id") and not k.endswith("_hub_file")}
    return factory(**kwargs)


_FETCH_KEYS = {"hub_id", "revision", "allow_patterns", "hub_file"}


@dataclasses.dataclass
class StageContext:
    """Run-wide facts every stage may need: where outputs go and where models live."""

    out_dir: str
    models_dir: str = "models"
    config_hash: str = ""


class Stage:
    """Base class. Subclasses set ``Params`` (a dataclass validated from the YAML) and implement
    ``process``. ``uses_model = True`` makes the Ray runner run the stage as an actor pool."""

    name: ClassVar[str] = "stage"
    Params: ClassVar[type] = None  # a dataclass; None means the stage takes no params
    uses_model: ClassVar[bool] = False
    # True: the stage reads a row's extracted clip (``clip_path``) and earlier stages' files, and the source
    # video only for a row without a clip; the map runner then fetches no source video for it.
    reads_clips: ClassVar[bool] = False

    def __init__(self, params=None, backend: dict | None = None, ctx: StageContext | None = None):
        self.params = params if params is not None else (self.Params() if self.Params else None)
        self.backend_cfg = backend or {}
        self.ctx = ctx or StageContext(out_dir="output")
        self._ready = False

    def setup(self) -> None:
        """Load models or other heavy state. Runs once per worker."""

    def process(self, rows: list[Record]) -> list[Record]:
        raise NotImplementedError

    def reads_source_video(self, row: Record) -> bool:
        """Whether ``process`` reads the source video (``video_path``) of the ``ok`` row ``row``."""
        return not (self.reads_clips and row.get("clip_path"))

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    def __call__(self, rows: list[Record]) -> list[Record]:
        self.ensure_setup()
        todo = [r for r in rows if r.get("status", "ok") == "ok"]
        passed = [r for r in rows if r.get("status", "ok") != "ok"]
        if not todo:
            return passed
        try:
            out = self.process(todo)
        except Exception:
            if len(todo) == 1:
                out = [mark_failed(todo[0], self.name)]
            else:
                # Isolate the bad row: re-run one by one so one corrupt input costs one row, not a batch.
                out = []
                for r in todo:
                    try:
                        out.extend(self.process([r]))
                    except Exception:
                        out.append(mark_failed(r, self.name))
        return passed + out


def mark_failed(row: Record, stage: str) -> Record:
    err = traceback.format_exc(limit=3).strip().splitlines()[-1]
    log.warning("stage %s failed on %s/%s: %s", stage, row.get("video_id"), row.get("clip_id"), err)
    return {**row, "status": "failed", "reason": f"{stage}:error", "error": err}


def reject(row: Record, reason: str, **extra) -> Record:
    """Return a copy of ``row`` marked rejected with ``reason`` (and extra columns)."""
    return {**row, **extra, "status": "rejected", "reason": reason}


def strip_transient(row: Record) -> Record:
    return {k: v for k, v in row.items() if not k.startswith("_")}


class StageGroup:
    """Consecutive stages run in one worker call, so decoded frames (transient ``_`` keys) are shared:
    each video is decoded once per group."""

    def __init__(self, stages: list[Stage]):
        self.stages = stages

    @property
    def uses_model(self) -> bool:
        return any(s.uses_model for s in self.stages)

    def setup(self) -> None:
        for s in self.stages:
            s.ensure_setup()

    def __call__(self, rows: list[Record]) -> list[Record]:
        """Runs every stage; ``self.counts`` then holds, per stage, [rows in, rows failed, first error] of
        this call (the runner's failure-rate stop adds them up over the run)."""
        self.counts: dict[str, list] = {}
        for s in self.stages:
            n_in = sum(r.get("status", "ok") == "ok" for r in rows)
            failed_before = sum(r.get("status") == "failed" for r in rows)
            rows = s(rows)
            failed = [r for r in rows if r.get("status") == "failed" and r.get("reason") == f"{s.name}:error"]
            n_failed = max(0, sum(r.get("status") == "failed" for r in rows) - failed_before)
            self.counts[s.name] = [n_in, n_failed, failed[0].get("error") if failed and n_failed else None]
        return [strip_transient(r) for r in rows]
