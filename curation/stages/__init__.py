"""Pipeline stages, one module each; importing this package's modules registers them."""

import importlib
import os
import pkgutil


def load_all() -> dict:
    """Import every stage and backend module so the registries are complete; return the stage registry."""
    from curation import backends
    from curation.stage import STAGES

    for pkg in (backends, importlib.import_module(__name__)):
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{pkg.__name__}.{mod.name}")
    # Extra stage modules (a user's own stages, or test stages) named in CURATION_PLUGINS, comma-separated;
    # read here so Ray workers, which inherit the environment, register them too.
    for name in filter(None, os.environ.get("CURATION_PLUGINS", "").split(",")):
        importlib.import_module(name.strip())
    return STAGES
