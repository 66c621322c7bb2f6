"""`make bench`: run every bench/bench_*.py, merge their figures into bench-results.json, print a table."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import sys
import time
import traceback

import bench


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default="", help="comma-separated module names (e.g. bench_model)")
    ap.add_argument("--out", default="bench-results.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    results: dict[str, float] = {}
    if os.path.exists(args.out):  # keep figures of benches not run this time (--only)
        with open(args.out) as f:
            results.update(json.load(f))
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
        print(f"   {name} took {time.time() - t0:.1f} s", flush=True)
    results["machine"] = f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}"
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    width = max(len(k) for k in results)
    print(f"\n{'figure':{width}s}  value")
    for k in sorted(results):
        print(f"{k:{width}s}  {results[k]}")
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
