"""`make weights` (curation.weights): finds hub models and hand-copied ones in the config, records sha256,
fails fast."""

import json
import time

import pytest
import yaml

from curation.models import ModelHashMismatch, ModelUnpinned, resolve_model_path
from curation.weights import local_entries, main, model_entries


def _config(tmp_path):
    cfg = {
        "models_dir": str(tmp_path / "models"),
        "pipelines": {
            "prod": [
                {
                    "stage": "caption",
                    "backend": {
                        "name": "qwen2_5_vl",
                        "model_path": "Qwen2.5-VL-7B-Instruct",
                        "hub_id": "Qwen/Qwen2.5-VL-7B-Instruct",
                    },
                },
                {
                    "stage": "subjects",
                    "backend": {"name": "hf_llm", "model_path": "local-llm", "hub_id": "org/llm"},
                },
                {"stage": "ground", "backend": {"name": "human"}},
            ]
        },
        "models": {"clip": {"path": "clip.bin", "hub_id": "org/clip"}},
    }
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p, cfg


def test_entries_and_offline_failure(tmp_path, monkeypatch, capsys):
    path, cfg = _config(tmp_path)
    assert [e["hub_id"] for e in model_entries(cfg)] == ["Qwen/Qwen2.5-VL-7B-Instruct", "org/llm", "org/clip"]
    llm = tmp_path / "models" / "local-llm"
    llm.mkdir(parents=True)
    (llm / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    rc = main(["--config", str(path)])
    assert rc == 1 and time.monotonic() - t0 < 5  # fails fast, no hanging retries
    err = capsys.readouterr().err
    assert "MISSING 2 model(s)" in err and "Qwen/Qwen2.5-VL-7B-Instruct" in err and "HF_HUB_OFFLINE" in err
    sums = json.loads((tmp_path / "models" / "SHA256SUMS.json").read_text())
    assert list(sums) == ["local-llm/model.safetensors"]
    # The recorded hash is what model loading checks: a changed file is refused.
    assert resolve_model_path("local-llm", tmp_path / "models") == tmp_path / "models" / "local-llm"
    (llm / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ModelHashMismatch):
        resolve_model_path("local-llm", tmp_path / "models")


def test_models_copied_in_by_hand_are_recorded_too(tmp_path, monkeypatch, capsys):
    """Model paths without a hub_id (insightface buffalo_l, the aesthetic MLP, evaluation models, a training
    config's encoders), at any depth of a backend: `make weights` records the sha256 of those present, so
    loading them is checked, and lists those absent."""
    cfg = {
        "models_dir": str(tmp_path / "models"),
        "pipelines": {
            "prod": [
                {"stage": "faces", "backend": {"detector": {"name": "scrfd", "model_path": "buffalo_l"}}},
                {"stage": "aesthetic", "backend": {"name": "laion_mlp", "mlp_path": "aesthetic/mlp.pth"}},
            ]
        },
        "evaluation": {"dino": {"model_path": "dinov2-small"}, "clip": {"model_path": ""}},
        "encoders": {"vae": {"backend": "wan_vae", "path": str(tmp_path / "models" / "wan" / "vae")}},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert [(e["where"], e["path"]) for e in local_entries(cfg)] == [
        ("pipelines.prod[0].faces.backend.detector.model_path", "buffalo_l"),
        ("pipelines.prod[1].aesthetic.backend.mlp_path", "aesthetic/mlp.pth"),
        ("evaluation.dino.model_path", "dinov2-small"),
        ("encoders.vae.path", str(tmp_path / "models" / "wan" / "vae")),
    ]
    buffalo = tmp_path / "models" / "buffalo_l"
    buffalo.mkdir(parents=True)
    (buffalo / "det_10g.onnx").write_bytes(b"onnx")
    (tmp_path / "models" / "wan" / "vae").mkdir(parents=True)
    (tmp_path / "models" / "wan" / "vae" / "config.json").write_text("{}")
    with pytest.raises(ModelUnpinned, match="make weights"):  # before `make weights`: refused
        resolve_model_path("buffalo_l/det_10g.onnx", tmp_path / "models")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["--config", str(tmp_path / "p.yaml")]) == 1
    out, err = capsys.readouterr()
    assert "copied in by hand" in out and "MISSING 2 model(s)" in err and "aesthetic/mlp.pth" in err
    sums = json.loads((tmp_path / "models" / "SHA256SUMS.json").read_text())
    assert list(sums) == ["buffalo_l/det_10g.onnx", "wan/vae/config.json"]
    assert resolve_model_path("buffalo_l/det_10g.onnx", tmp_path / "models").name == "det_10g.onnx"
