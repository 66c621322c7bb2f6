"""The map phase's local disk and source-video traffic on the bundled sample curated from and into a real
S3 API (moto's server on loopback, each request counted at the server): once the run is over no local
scratch file is left (the fetched source videos and every group's intermediate files are deleted once
their video has left the group), and each source video is downloaded once, by the one group that reads it
(the annotate and refs groups read the clips only). Each video's files go to the store as one pack per map
group, and the shard writer reads its clips and crops out of those packs."""

import io

import decord
import pytest
from PIL import Image

from bench.bench_map_io import measure
from curation.runner import plan
from curation.stage import StageContext
from curation.stages.registry import load_all


@pytest.mark.slow
def test_sample_into_s3_leaves_no_scratch_and_fetches_each_source_video_once():
    m = measure(videos=("gen01", "gen02"))
    f, res = m["figures"], m["result"]
    assert m["n_videos"] == 2 and res.totals["videos_failed"] == 0 and res.totals["clips_ok"] >= 1
    assert f["scratch_bytes_left_after_run"] == 0, m["files_left"]
    assert m["files_left"] == {}
    assert f["source_video_fetches_per_video"] == 1
    # one pack per video per group (cut, annotate, refs), its manifest record and its two tables; no loose
    # clip, crop or embedding object
    assert m["written_by_folder"]["cache"] == 3 * 2
    assert {"clips", "refs", "embeddings"}.isdisjoint(m["written_by_folder"])
    assert f["map_objects_written_per_video"] == 6
    # the shards' clips and crops, read out of the packs by offset, are whole files
    members = m["shard_members"]
    mp4s = {k: v for k, v in members.items() if k.endswith(".mp4")}
    jpgs = {k: v for k, v in members.items() if k.endswith(".jpg")}
    assert mp4s and jpgs
    for data in mp4s.values():
        assert data[4:8] == b"ftyp" and decord.VideoReader(io.BytesIO(data)).get_batch([0]).shape[0] == 1
    for data in jpgs.values():
        Image.open(io.BytesIO(data)).load()
    # the caller's source rows are not changed by the run (their URIs stay: a second run can reuse them)
    assert all(r["video_path"].startswith("s3://") and "video_uri" not in r for r in m["rows"])


def test_only_the_cut_group_reads_the_source_video():
    from curation.config import load_config

    cfg = load_config("pipelines.yaml")
    groups, _ = plan(cfg.pipelines["default"])
    stages = load_all()
    ctx = StageContext(out_dir="")
    clip_row = {"video_id": "v", "clip_id": "v-0000", "clip_path": "clips/v/v-0000.mp4", "status": "ok"}
    video_row = {"video_id": "v", "video_path": "s3://b/videos/v.mp4", "status": "ok"}
    reads = {}
    for g in groups:
        built = [stages[s.stage](params={}, backend={}, ctx=ctx) for s in g.specs]
        row = video_row if g.name == "cut" else clip_row
        reads[g.name] = any(s.reads_source_video(row) for s in built)
    assert reads == {"cut": True, "annotate": False, "refs": False}
    clip_readers = {n for n, cls in stages.items() if cls.reads_clips}
    assert clip_readers == {"caption", "subjects", "ground", "subject_embed", "faces"}
    caption = stages["caption"](params={}, backend={}, ctx=ctx)
    assert caption.reads_source_video(video_row)  # a row without a clip: caption reads the source span
