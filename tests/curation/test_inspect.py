"""Inspection CLI tests: validate passes good shards and names broken ones; stats, show, html give output."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pytest

from curation import inspect as shard_inspect
from curation.shards import iter_tar_samples, read_index, write_tar
from tests.curation.test_shards import make_rows, write


@pytest.fixture()
def shards(tmp_path):
    write(tmp_path, make_rows(str(tmp_path), n_videos=4), maxcount=3)
    return tmp_path / "shards"


def test_validate_passes_good_shards_through_the_cli(shards):
    run = subprocess.run(
        [sys.executable, "-m", "curation.inspect", "validate", str(shards)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_validate_fails_on_a_truncated_shard(shards, capsys):
    path = shards / read_index(shards)["shards"][1]["name"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert shard_inspect.validate(str(shards)) == 1
    out = capsys.readouterr().out
    assert f"BROKEN {path.name}" in out and "shard-000000.tar" not in out.split("BROKEN", 1)[1].split("\n")[0]


def _rewrite_without(shards, member_ext: str) -> str:
    """Rewrite the first shard with its first sample missing ``member_ext`` (the index is left as it was)."""
    path = shards / read_index(shards)["shards"][0]["name"]
    samples = [{"__key__": k, **s} for k, s in iter_tar_samples(path)]
    del samples[0][member_ext]
    write_tar(path, samples)
    return samples[0]["__key__"]


def test_validate_fails_on_a_sample_missing_its_video(shards, capsys):
    key = _rewrite_without(shards, "mp4")
    assert shard_inspect.validate(str(shards)) == 1
    out = capsys.readouterr().out
    assert f"{key}: missing mp4" in out


def test_validate_checks_boxes_and_references(shards, capsys):
    path = shards / read_index(shards)["shards"][0]["name"]
    samples = [{"__key__": k, **s} for k, s in iter_tar_samples(path)]
    meta = json.loads(samples[0]["json"])
    meta["subjects"][0]["boxes"][0]["box"] = [10, 8, 5000, 56]
    samples[0]["json"] = json.dumps(meta).encode()
    samples[1]["ref_3.jpg"] = samples[1]["ref_0.jpg"]  # a gap: ref_3 without ref_1, ref_2
    write_tar(path, samples)
    assert shard_inspect.validate(str(shards)) == 1
    out = capsys.readouterr().out
    assert "outside the 96x64 frame" in out and "without gaps" in out and "sha256 differs" in out


def test_stats_show_and_html(shards, tmp_path, capsys):
    st = shard_inspect.stats(str(shards))
    assert st["samples"] == 8 and st["pair_type"] == {"in_pair": 4, "cross_pair": 4}
    # v00 cat, v01 cup, v02 man + cup, v03 cat; the man has no partner, so v02's cross sample has one ref
    assert st["category"] == {"animal": 4, "product": 4, "human": 1} and st["n_refs"] == {"1": 7, "2": 1}
    assert sum(st["histograms"]["similarity"]["counts"]) == 4
    assert "pair type: cross_pair=4, in_pair=4" in capsys.readouterr().out
    pngs = shard_inspect.show(str(shards), str(tmp_path / "show"), limit=2)
    assert len(pngs) == 2
    from PIL import Image

    with Image.open(pngs[0]) as im:
        assert im.size[0] > 4 * 160 and im.size[1] > 160
    page = shard_inspect.gallery(str(shards), str(tmp_path / "html"), limit=5)
    text = open(page, encoding="utf-8").read()
    assert text.count('class="card"') == 5 and text.count('class="ref"') >= 5
    assert all((tmp_path / "html" / src.split('"')[0]).is_file() for src in text.split('src="')[1:])


def test_tar_listing_matches_index(shards):
    for e in read_index(shards)["shards"]:
        with tarfile.open(shards / e["name"]) as tf:
            keys = sorted({m.name.split(".", 1)[0] for m in tf.getmembers()})
        assert keys == sorted(e["keys"])
