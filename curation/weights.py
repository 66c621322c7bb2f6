"""`make weights`: fetch the production models named in pipelines.yaml into models/ and record the sha256 of
every model file there (fetched or copied in by hand), the pins curation.models checks at load time."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from curation.models import model_files, sha256_file


def model_entries(cfg: dict) -> list[dict]:
    """Every model with a ``hub_id`` in the config: stage backends ({model_path, hub_id, revision?,
    allow_patterns?}; any ``*_path`` key paired with ``*_hub_id`` too) and the top-level ``models``."""
    found: dict[str, dict] = {}

    def add(where: str, path: str, hub_id: str, spec: dict):
        if path and hub_id:
            found.setdefault(
                path,
                {
                    "where": where,
                    "path": path,
                    "hub_id": hub_id,
                    "revision": spec.get("revision"),
                    "allow_patterns": spec.get("allow_patterns"),
                    "hub_file": spec.get("hub_file"),
                },
            )

    for pname, stages in (cfg.get("pipelines") or {}).items():
        for i, st in enumerate(stages or []):
            backend = st.get("backend") or {}
            where = f"pipelines.{pname}[{i}].{st.get('stage')}.backend"
            add(where, backend.get("model_path", ""), backend.get("hub_id", ""), backend)
            for key, val in backend.items():
                if key.endswith("_hub_id"):
                    add(f"{where}.{key}", backend.get(key[: -len("_hub_id")] + "_path", ""), val, backend)
    for name, spec in (cfg.get("models") or {}).items():
        if isinstance(spec, dict):
            add(f"models.{name}", spec.get("path", ""), spec.get("hub_id", ""), spec)
    return list(found.values())


def local_entries(cfg: dict) -> list[dict]:
    """Model paths in the config without a hub_id (copied in by hand: insightface buffalo_l, the aesthetic
    MLP, the evaluation models, a training config's encoders): every ``path`` / ``*_path`` key, at any depth,
    of the stage backends, the ``evaluation`` block, the top-level ``models`` and ``encoders``. `make
    weights` records the sha256 of those present."""
    hub = {e["path"] for e in model_entries(cfg)}
    found: dict[str, dict] = {}

    def walk(obj, where: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(v, str) and v and (k == "path" or k.endswith("_path")):
                    if v not in hub:
                        found.setdefault(v, {"where": f"{where}.{k}", "path": v, "hub_id": ""})
                elif isinstance(v, (dict, list)):
                    walk(v, f"{where}.{k}")
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{where}[{i}]")

    for pname, stages in (cfg.get("pipelines") or {}).items():
        for i, st in enumerate(stages or []):
            walk(st.get("backend") or {}, f"pipelines.{pname}[{i}].{st.get('stage')}.backend")
    walk(cfg.get("evaluation") or {}, "evaluation")
    walk(cfg.get("models") or {}, "models")
    walk(cfg.get("encoders") or {}, "encoders")
    return list(found.values())


def hub_reachable(endpoint: str, timeout_s: float) -> str | None:
    """None when the hub answers within ``timeout_s``, else why not (offline mode, DNS, refused, timeout)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    try:
        with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None  # the server answered (any status): the network path works
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        return f"{endpoint} unreachable ({getattr(e, 'reason', e)})"


def record_hashes(models_dir: Path, targets: list[Path]) -> dict[str, str]:
    """Add the sha256 of every file under ``targets`` to ``<models_dir>/SHA256SUMS.json`` (relpath -> sha256,
    what curation.models checks at load time); written atomically."""
    sums_path = models_dir / "SHA256SUMS.json"
    sums = json.loads(sums_path.read_text()) if sums_path.exists() else {}
    root = models_dir.resolve()
    for t in targets:
        for f in [t] if t.is_file() else model_files(t):  # model_files skips huggingface_hub's metadata
            sums[f.resolve().relative_to(root).as_posix()] = sha256_file(f)
    tmp = sums_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(sorted(sums.items())), indent=1) + "\n")
    os.replace(tmp, sums_path)
    return sums


def _present(p: Path) -> bool:
    return p.is_file() or (p.is_dir() and any(x.is_file() for x in p.rglob("*") if ".cache" not in x.parts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="pipelines.yaml")
    ap.add_argument("--models-dir", default=None, help="default: models_dir from the config")
    ap.add_argument(
        "--timeout-s", type=float, default=10.0, help="network timeout for the reachability check"
    )
    ap.add_argument("--endpoint", default=os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    args = ap.parse_args(argv)

    with open(args.config) as f:
        cfg = yaml.safe_load(f) or {}
    models_dir = Path(args.models_dir or cfg.get("models_dir") or "models")
    models_dir.mkdir(parents=True, exist_ok=True)
    entries = model_entries(cfg)
    by_hand = local_entries(cfg)
    if not entries and not by_hand:
        print(f"{args.config}: no backend names a model path; nothing to fetch or record.")
        return 0

    targets, missing = [], []
    offline_why: str | None = ""  # "" = not checked yet
    for e in entries:
        target = Path(e["path"]) if os.path.isabs(e["path"]) else models_dir / e["path"]
        if _present(target):
            print(f"present  {target}  ({e['hub_id']})")
            targets.append(target)
            continue
        if offline_why == "":
            offline_why = hub_reachable(args.endpoint, args.timeout_s)
        if offline_why:
            missing.append((e, target, offline_why))
            continue
        try:
            from huggingface_hub import snapshot_download

            os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(args.timeout_s)))
            os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(max(args.timeout_s, 60))))
            print(f"fetching {e['hub_id']} -> {target}")
            # A path naming one weight file (an open_clip checkpoint, an MLP head) fetches just that file
            # into its folder; a folder path fetches the snapshot.
            one_file = target.suffix in (".bin", ".pt", ".pth", ".safetensors", ".onnx", ".gguf")
            snapshot_download(
                repo_id=e["hub_id"],
                revision=e["revision"],
                local_dir=str(target.parent if one_file else target),
                allow_patterns=[e.get("hub_file") or target.name] if one_file else e["allow_patterns"],
            )
            targets.append(target)
        except Exception as ex:  # one failed model must not hide the others' status
            missing.append((e, target, f"{type(ex).__name__}: {ex}"))

    for e in by_hand:  # where the loaders look: the path as given when it exists, else under models_dir
        target = Path(e["path"]) if os.path.exists(e["path"]) else models_dir / e["path"]
        if _present(target):
            print(f"present  {target}  (copied in by hand)")
            targets.append(target)
        else:
            missing.append((e, target, "not present, and it has no hub_id: copy it there by hand"))
    root = models_dir.resolve()
    for t in [t for t in targets if not t.resolve().is_relative_to(root)]:
        print(f"outside  {t}  (not under {models_dir}: not recorded; pin it with sha256 in the YAML)")
        targets.remove(t)
    if targets:
        record_hashes(models_dir, targets)
        print(f"recorded sha256 of {len(targets)} model(s) in {models_dir / 'SHA256SUMS.json'}")
    if missing:
        print(f"\nMISSING {len(missing)} model(s):", file=sys.stderr)
        for e, target, why in missing:
            source = e["hub_id"] or "(by hand)"
            print(
                f"  {source} -> {target}\n      named at {e['where']}; not fetched: {why}",
                file=sys.stderr,
            )
        print(
            "Provide them by running `make weights` where the hub is reachable, or by copying each model "
            "folder to the path shown (then rerun `make weights` to record its sha256), or point the "
            "model_path in pipelines.yaml at a local copy.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
