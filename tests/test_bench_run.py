"""`make bench`'s writer: only this run's figures, stamped; --only merges into a file of the same commit."""

from __future__ import annotations

import json
import sys
import types

import bench
from bench import run as bench_run


def _fake(monkeypatch, name: str, fn):
    mod = types.ModuleType(f"bench.{name}")
    mod.run = fn
    monkeypatch.setitem(sys.modules, f"bench.{name}", mod)


def _names(monkeypatch, names):
    monkeypatch.setattr(bench_run.pkgutil, "iter_modules",
                        lambda path: [types.SimpleNamespace(name=n) for n in names])


def test_bench_file_holds_only_this_runs_figures(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"stale_figure": 1.0, "bench_commit": "old"}))
    _names(monkeypatch, ["bench_a", "bench_b"])
    _fake(monkeypatch, "bench_a", lambda: {"a_per_s": 2.0})
    _fake(monkeypatch, "bench_b", lambda: 1 / 0)  # a failing bench
    assert bench_run.main(["--out", str(out)]) == 1
    got = json.loads(out.read_text())
    assert got["a_per_s"] == 2.0 and "stale_figure" not in got
    assert got["bench_commit"] == bench_run.current_commit() and got["machine"] == bench_run.machine()
    assert got["bench_run_at"].endswith("+00:00")


def test_only_merges_into_same_commit_and_drops_a_failed_benchs_old_figures(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    _names(monkeypatch, ["bench_a", "bench_b"])
    _fake(monkeypatch, "bench_a", lambda: {"a_per_s": 2.0})
    _fake(monkeypatch, "bench_b", lambda: {"b_ratio": 3.0})
    assert bench_run.main(["--out", str(out)]) == 0
    _fake(monkeypatch, "bench_b", lambda: 1 / 0)
    assert bench_run.main(["--out", str(out), "--only", "bench_b"]) == 1
    got = json.loads(out.read_text())
    assert got["a_per_s"] == 2.0 and "b_ratio" not in got  # kept a's; b's old figure is gone
    # a file of another commit is not merged into
    got["bench_commit"] = "someothercommit"
    out.write_text(json.dumps(got))
    _fake(monkeypatch, "bench_b", lambda: {"b_ratio": 4.0})
    assert bench_run.main(["--out", str(out), "--only", "bench_b"]) == 0
    got = json.loads(out.read_text())
    assert got["b_ratio"] == 4.0 and "a_per_s" not in got
    assert bench.__name__ == "bench"
