"""`make bench`: run every bench/bench_*.py, write the figures this run measured to bench-results.json,
stamped with the run's time, commit and machine, and print a table."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pkgutil
import platform
import subprocess
import sys
import time
import traceback

import bench

STAMP_KEYS = ("bench_run_at", "bench_commit", "machine", "bench_modules")


def current_commit() -> str:
    """HEAD's hash, with ``+dirty`` when the work tree has uncommitted changes to tracked files."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.strip() + ("+dirty" if dirty else "")


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}"


def merge_base(path: str, commit: str, rerun: list[str]) -> dict:
    """What an ``--only`` run keeps from an existing file: the figures of the other benches, and only when
    that file was written at the same commit on the same machine. The benches run again lose their old
    figures first, so a bench that fails now leaves none behind."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return {}
    if old.get("bench_commit") != commit or old.get("machine") != machine():
        return {}
    modules = dict(old.get("bench_modules") or {})
    dropped = {k for name in rerun for k in modules.pop(name, [])}
    kept = {k: v for k, v in old.items() if k not in STAMP_KEYS and k not in dropped}
    return {**kept, "bench_modules": modules}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default="", help="comma-separated module names (e.g. bench_model)")
    ap.add_argument("--out", default="bench-results.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    commit = current_commit()
    results = merge_base(args.out, commit, names) if args.only else {}
    modules: dict[str, list[str]] = results.pop("bench_modules", {})
    failed = []
    for name in names:
        t0 = time.time()
        print(f"== {name}", flush=True)
        try:
            figures = importlib.import_module(f"bench.{name}").run()
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        results.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()})
        modules[name] = sorted(figures)
        print(f"   {name} took {time.time() - t0:.1f} s", flush=True)
    results.update(
        bench_run_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        bench_commit=commit,
        machine=machine(),
        bench_modules=modules,
    )
    tmp = f"{args.out}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    os.replace(tmp, args.out)
    shown = {k: v for k, v in results.items() if k != "bench_modules"}
    width = max(len(k) for k in shown)
    print(f"\n{'figure':{width}s}  value")
    for k in sorted(shown):
        print(f"{k:{width}s}  {shown[k]}")
    if failed:
        print(f"\nfailed: {', '.join(failed)} (no figure of theirs is in {args.out})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
