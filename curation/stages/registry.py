"""The stage registry: every stage and backend module imported, and a stage spec checked against it."""

from __future__ import annotations

import importlib
import os
import pkgutil

from curation.config import ConfigError, StageSpec, from_dict


def load_all() -> dict:
    """Import every stage and backend module so the registries are complete; return the stage registry."""
    from curation import backends, stages
    from curation.stage import STAGES

    for pkg in (backends, stages):
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_") and mod.name != "registry":
                importlib.import_module(f"{pkg.__name__}.{mod.name}")
    # Extra stage modules (a user's own stages, or test stages) named in CURATION_PLUGINS, comma-separated;
    # read here so Ray workers, which inherit the environment, register them too.
    for name in filter(None, os.environ.get("CURATION_PLUGINS", "").split(",")):
        importlib.import_module(name.strip())
    return STAGES


def validate_stage_spec(spec: StageSpec, path: str):
    """Check a map stage exists and its params match its Params dataclass; returns the typed params."""
    stages = load_all()
    if spec.stage not in stages:
        raise ConfigError(f"{path}.stage: unknown stage {spec.stage!r}; allowed values: {sorted(stages)}")
    cls = stages[spec.stage]
    if cls.Params is None:
        if spec.params:
            raise ConfigError(f"{path}.params: stage {spec.stage!r} takes no params")
        return None
    return from_dict(cls.Params, spec.params, f"{path}.params")
