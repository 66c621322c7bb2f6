"""`make weights` (curation.weights): finds hub models in the config, records sha256, fails fast."""

import json
import time

import pytest
import yaml

from curation.models import ModelHashMismatch, resolve_model_path
from curation.weights import main, model_entries


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
