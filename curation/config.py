"""pipelines.yaml validated into typed config: unknown keys and bad values fail at once, naming their path."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem, with the dotted key path it was found at."""


def field(default=dataclasses.MISSING, *, ge=None, le=None, gt=None, lt=None, choices=None, **kw):
    """A dataclass field with range / choice constraints checked by ``from_dict``."""
    meta = {k: v for k, v in dict(ge=ge, le=le, gt=gt, lt=lt, choices=choices).items() if v is not None}
    if default is not dataclasses.MISSING and isinstance(default, (list, dict)):
        val = default
        return dataclasses.field(default_factory=lambda: json.loads(json.dumps(val)), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp`` (recursing into dataclasses, lists, dicts, Optionals)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {args}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not allowed; allowed values: {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def _check_meta(value, meta: dict, path: str) -> None:
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{path}: {value!r} is not allowed; allowed values: {list(meta['choices'])}")
    for key, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("le", lambda v, b: v <= b, "<="),
        ("gt", lambda v, b: v > b, ">"),
        ("lt", lambda v, b: v < b, "<"),
    ):
        if key in meta:
            vals = value if isinstance(value, list) else [value]
            for v in vals:
                if not ok(v, meta[key]):
                    raise ConfigError(f"{path}: {value!r} is out of range; must be {word} {meta[key]}")


def from_dict(cls, data: Any, path: str = ""):
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]}; allowed keys at {path or '<root>'}: {sorted(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], sub)
            _check_meta(kwargs[name], f.metadata, sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {sub}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path)
    return obj


# ---------------------------------------------------------------------------------------------------------
# The top-level schema. Stage and global-step params are checked against their own ``Params`` dataclasses
# by ``curation.runner.validate_pipelines`` (this module imports no other module of the project).


@dataclasses.dataclass
class Resources:
    num_cpus: float = field(0.25, gt=0)
    num_gpus: float = field(0.0, ge=0)
    batch_size: int = field(4, ge=1)
    concurrency: int = field(1, ge=1)  # actors of a model group's pool (its minimum when autoscaling)
    max_concurrency: int = field(0, ge=0)  # > concurrency: the pool autoscales between the two


@dataclasses.dataclass
class StageSpec:
    stage: str
    group: str = ""  # consecutive stages with the same non-empty group run in one worker call
    params: dict[str, Any] = field({})
    backend: dict[str, Any] = field({})  # e.g. {name: qwen2_5_vl, model_path: ...}
    resources: Resources = field(default_factory=Resources)


YOUTUBE_HOSTS = ["www.youtube.com", "youtube.com", "m.youtube.com", "youtu.be"]


@dataclasses.dataclass
class DownloadParams:
    max_height: int = field(720, ge=144)  # format selection: an H.264 MP4 at most this tall
    # The limits hold per node (video sites rate-limit per egress address, i.e. per machine):
    per_node_concurrency: int = field(8, ge=1)  # downloads in flight on one node, all hosts together
    # 0: per_node_concurrency x the nodes the pool runs on (alive, num_cpus CPUs or more); > 0: also a cap on
    # the downloads in flight over the whole cluster
    concurrency: int = field(0, ge=0)
    nodes_every_s: float = field(30.0, gt=0)  # the alive nodes are read again this often (new ones get work)
    per_host_concurrency: int = field(4, ge=1)  # downloads in flight per (node, host)
    per_host_rate_per_s: float = field(2.0, gt=0)  # download starts per second per (node, host)
    max_attempts: int = field(3, ge=1)  # per video per run, transient errors only
    max_total_attempts: int = field(9, ge=1)  # per video over all runs; then it is skipped (gave_up:<reason>)
    backoff_s: float = field(5.0, ge=0)  # first retry delay; doubles per attempt
    max_backoff_s: float = field(300.0, ge=0)
    socket_timeout_s: float = field(30.0, gt=0)  # a stalled connection fails after this
    max_filesize_mb: float = field(2048.0, gt=0)
    max_duration_s: float = field(4 * 3600.0, gt=0)
    rate_limit_bytes_per_s: int = field(0, ge=0)  # per download; 0 = unlimited
    sections: bool = True  # fetch only the CSV spans (padded) where the site reports the duration; the
    # curation maps the spans onto the section file (its log's time_offset_s)
    sections_max_fraction: float = field(0.5, gt=0, le=1)
    section_pad_s: float = field(2.0, ge=0)
    allowed_hosts: list[str] = field(YOUTUBE_HOSTS)
    num_cpus: float = field(0.25, gt=0)  # Ray CPUs per download task (mostly waiting on the network)
    chunk_rows: int = field(2000, ge=1)  # CSV rows read (and their logs checked) per step
    progress_every_s: float = field(10.0, gt=0)
    limit: int = field(0, ge=0)  # 0 = every row


def parse_download_params(raw: Any, path: str = "download") -> DownloadParams:
    """A ``download:`` mapping (or true/false/None for the defaults) -> DownloadParams; ConfigError naming
    the key on an unknown key or bad value."""
    if raw is None or isinstance(raw, bool):
        return DownloadParams()
    if isinstance(raw, DownloadParams):
        return raw
    return from_dict(DownloadParams, raw, path)


@dataclasses.dataclass
class SourceSpec:
    kind: Literal["panda70m", "dir", "sample"]
    csv: str = ""  # panda70m: metadata CSV
    videos_dir: str = ""  # panda70m: where {videoID}.mp4|.mkv|.webm live; dir: the folder to scan
    download: bool | dict[str, Any] = False  # panda70m: true, or the download step's params (a mapping)
    sample_dir: str = "data/sample"  # sample: where the generated footage and CSV are written
    limit: int = field(0, ge=0)  # 0 = all videos
    # panda70m: spans whose `desirable_filtering` label is not listed are skipped before download and
    # decode (reason panda:<label>); [] keeps every span. Spans without a label are kept.
    keep_labels: list[str] = field(["desirable"])

    def validate(self, path: str = "") -> None:
        if isinstance(self.download, dict):
            parse_download_params(self.download, f"{path}.download")


@dataclasses.dataclass
class RayConfig:
    address: str = ""  # empty: RAY_ADDRESS from the environment, else a local instance
    num_cpus: int = field(2, ge=1)  # local instance only
    dashboard: bool = False
    dashboard_host: str = "127.0.0.1"
    node_ip: str = "127.0.0.1"


@dataclasses.dataclass
class RunConfig:
    max_fail_frac: float = field(0.5, ge=0.0, le=1.0)  # a stage failing more of its rows stops the run
    min_fail_rows: int = field(20, ge=1)  # ... once it has seen at least this many rows
    videos_per_part: int = field(16, ge=1)  # source rows per Parquet part of a folder/sample source
    # Videos per Ray Data block from the source on: a map group's task hands a block's videos to the next
    # group once it has done them all, and the blocks in flight bound how many workers have input. A source
    # of fewer than 256 videos gets one per block. Ray keeps every block's stats in the driver until the
    # run ends, so a source makes at most max_source_blocks blocks (more videos per block beyond that):
    # the driver's memory stays bounded whatever the source size (README, "The source at cluster size").
    videos_per_block: int = field(64, ge=1)
    max_source_blocks: int = field(4096, ge=0)  # 0: no cap
    # Panda-70M CSV records per Parquet part of the Ray ingest (curation.ingest; a CSV of at most 256 records:
    # one per part). The parts are keyed by the CSV's digest, so changing this re-splits the CSV once.
    source_part_rows: int = field(10_000, ge=1)
    # Byte cap of each machine's download cache of remote objects (curation.storage: least recently used
    # files go first; GB = 10^9 bytes; 0 keeps nothing beyond the file in use). Env PHANTOM_CACHE_MAX_GB.
    cache_max_gb: float = field(20.0, ge=0.0)


@dataclasses.dataclass
class Config:
    output_dir: str = "output"
    models_dir: str = "models"
    default_source: str = "sample"
    default_pipeline: str = "default"
    sources: dict[str, SourceSpec] = field({})
    pipelines: dict[str, list[StageSpec]] = field({})
    ray: RayConfig = field(default_factory=RayConfig)
    run: RunConfig = field(default_factory=RunConfig)
    models: dict[str, Any] = field({})  # named model files: {name: {path:, sha256:, url:}}
    evaluation: dict[str, Any] = field({})  # metric models (curation.metrics.metrics_config validates it)

    def validate(self, path: str = "") -> None:
        if self.default_source not in self.sources:
            raise ConfigError(f"default_source: {self.default_source!r} is not one of {sorted(self.sources)}")
        if self.default_pipeline not in self.pipelines:
            raise ConfigError(
                f"default_pipeline: {self.default_pipeline!r} is not one of {sorted(self.pipelines)}"
            )


def yaml_error_line(path: str | Path, e: yaml.YAMLError) -> str:
    """One line for a YAML error: ``<file>:<line>:<column>: <what is wrong>``. A tag that safe_load refuses
    (``!!python/...``) is named as such: nothing was constructed or run."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = " ".join(str(getattr(e, "problem", None) or e).split())
    tag = re.search(r"tag '([^']*)'", problem)
    if tag:
        name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        problem = f"the tag {name} is not allowed (plain YAML only: safe_load builds no Python objects)"
    context = getattr(e, "context", None)
    if context and not tag:
        cmark = getattr(e, "context_mark", None)
        at = f" at line {cmark.line + 1}" if cmark is not None and cmark is not mark else ""
        problem = f"{problem} ({' '.join(str(context).split())}{at})"
    return f"{where}: {problem}"


def load_yaml(path: str | Path) -> Any:
    """``yaml.safe_load`` of a file; a missing file, bad encoding or malformed YAML is a one-line
    ConfigError naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error_line(path, e)) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def load_config(path: str | Path = "pipelines.yaml") -> Config:
    return from_dict(Config, load_yaml(path))


def config_hash(cfg: Config, pipeline: str) -> str:
    """A short stable hash of what makes the output: the pipeline's stages and their params."""
    blob = json.dumps([dataclasses.asdict(s) for s in cfg.pipelines[pipeline]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
