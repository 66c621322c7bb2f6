"""Tests for the frozen input head: real MiniLM and MobileNetV2 weights, pixel_patch, tiny real backends."""

from __future__ import annotations

import json

import pytest
import torch

from curation.models import ModelUnpinned, folder_sha256, sha256_file
from training.encoders import (
    MOBILENET_FILE,
    MOBILENET_PACKAGE,
    MOBILENET_SHA256,
    HFTextEncoder,
    ImageEncoder,
    ModelNotFound,
    PixelPatchVAE,
    TextEncoder,
    VideoVAE,
    build_encoders,
    build_one,
    write_unpinned_record,
)


@pytest.fixture(scope="module")
def offline():
    return build_encoders({})


def photo(name: str, size: int = 160) -> torch.Tensor:
    import skimage.data

    img = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1)[None].float() / 255
    return torch.nn.functional.interpolate(img, size=(size, size), mode="bilinear", antialias=True)


def test_offline_defaults_follow_the_protocols(offline):
    assert isinstance(offline.vae, VideoVAE) and isinstance(offline.text, TextEncoder)
    assert isinstance(offline.image, ImageEncoder)
    assert (offline.vae.latent_channels, offline.text.dim, offline.image.dim) == (12, 384, 1280)


def test_minilm_real_weights_tokens_and_meaning(offline):
    texts = ["a photo of a cat", "a picture of a kitten sleeping", "quarterly stock market report", ""]
    states, mask = offline.text.encode(texts)
    assert states.shape[0] == 4 and states.shape[2] == 384 and mask.shape == states.shape[:2]
    assert mask.dtype == torch.bool and mask[3].sum() == 2  # empty prompt: [CLS] [SEP]
    assert torch.equal(states[~mask], torch.zeros_like(states[~mask]))  # padding zeroed
    pooled = torch.nn.functional.normalize(
        (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1
    )
    # real sentence-embedding weights put cat/kitten far closer than cat/stock market
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.2


def test_mobilenet_real_weights_recognize_a_cat(offline):
    from curation.models import package_file

    feats = offline.image.encode(torch.cat([photo("chelsea"), photo("coffee")]))
    assert feats.shape == (2, 1280) and (feats >= 0).all()  # pooled ReLU6 features
    # the ImageNet classifier of the same checkpoint on our features: chelsea is a cat (classes 281-285)
    sd = torch.load(package_file(MOBILENET_PACKAGE, MOBILENET_FILE, MOBILENET_SHA256), weights_only=True)
    logits = feats @ sd["classifier.1.weight"].T + sd["classifier.1.bias"]
    assert 281 <= logits[0].argmax().item() <= 285
    assert not 281 <= logits[1].argmax().item() <= 285


def test_pixel_patch_round_trips_exactly():
    vae = PixelPatchVAE(factor=2)
    video = torch.rand(2, 3, 5, 16, 24) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (2, 12, 5, 8, 12)
    assert torch.equal(vae.decode(z), video)
    img = video[:, :, 0]
    assert torch.equal(vae.encode_image(img), z[:, :, 0])  # a reference is exactly one latent frame
    with pytest.raises(ValueError, match="divisible"):
        vae.encode(torch.zeros(1, 3, 1, 15, 16))


def test_missing_model_paths_are_clear_errors():
    with pytest.raises(ModelNotFound, match=r"/nonexistent/wan-vae.*make weights.*encoders\.vae\.path"):
        build_encoders({"vae": {"backend": "wan_vae", "path": "/nonexistent/wan-vae"}})
    with pytest.raises(ModelNotFound, match=r"encoders\.text\.path"):
        build_one("text", {"backend": "hf_text"})
    with pytest.raises(ModelNotFound, match=r"/nonexistent/clip\.bin"):
        build_one("image", {"backend": "open_clip", "arch": "ViT-B-32", "path": "/nonexistent/clip.bin"})
    with pytest.raises(ValueError, match="allowed"):
        build_one("vae", {"backend": "sdxl_vae"})
    with pytest.raises(ValueError, match="unknown keys"):
        build_one("vae", {"backend": "pixel_patch", "factr": 2})
    with pytest.raises(ValueError, match="unknown keys"):
        build_encoders({"audio": {}})


def tiny_transformers_folder(tmp_path, kind: str):
    """A random-init tiny model of a real architecture, saved with the real MiniLM tokenizer."""
    import transformers

    from curation.models import package_file
    from training.encoders import MINILM_FILE, MINILM_PACKAGE, MINILM_SHA256

    tok = transformers.AutoTokenizer.from_pretrained(
        package_file(MINILM_PACKAGE, MINILM_FILE, MINILM_SHA256).parent
    )
    torch.manual_seed(0)
    if kind == "llm":  # decoder-only, like the LLM text encoders of recent video models
        cfg = transformers.Qwen2Config(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        model = transformers.Qwen2Model(cfg)
    else:  # encoder-decoder: only the encoder must be loaded
        cfg = transformers.T5Config(
            vocab_size=tok.vocab_size,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            architectures=["T5ForConditionalGeneration"],
        )
        model = transformers.T5ForConditionalGeneration(cfg)
    path = tmp_path / kind
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model.eval()


@pytest.mark.parametrize("kind", ["llm", "t5"])
def test_hf_text_backend_on_tiny_real_architectures(tmp_path, kind):
    path, model = tiny_transformers_folder(tmp_path, kind)
    enc = build_one(
        "text",
        {
            "backend": "hf_text",
            "path": str(path),
            "sha256": folder_sha256(path),  # every file of the tiny folder, pinned as it was saved
            "max_length": 16,
            "hidden_layer": -1 if kind == "t5" else 1,
        },
    )
    assert isinstance(enc, HFTextEncoder) and enc.dim == 32
    states, mask = enc.encode(["a dog runs on the beach", "hi"])
    assert states.shape == (2, mask.shape[1], 32) and mask.sum(1).tolist()[1] < mask.sum(1).tolist()[0]
    ids = enc.tokenizer(["a dog runs on the beach"], return_tensors="pt")
    with torch.no_grad():  # same numbers as the saved model run directly
        if kind == "t5":
            want = model.encoder(input_ids=ids["input_ids"]).last_hidden_state
        else:
            want = model(input_ids=ids["input_ids"], output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(states[0, : want.shape[1]], want[0], atol=1e-5, rtol=1e-4)
    if kind == "t5":
        assert "decoder" not in type(enc.model).__name__.lower()


def test_encoder_folder_without_a_pin_is_refused_and_unpinned_is_recorded(tmp_path):
    """A text-encoder folder with no pin (none in the YAML, none recorded by `make weights`) is refused with
    its folder digest and the key to set; ``sha256: unpinned`` loads it, and the run folder record names
    it."""
    path, _ = tiny_transformers_folder(tmp_path, "llm")
    cfg = {"backend": "hf_text", "path": str(path), "models_dir": str(tmp_path / "models")}
    with pytest.raises(ModelUnpinned) as e:
        build_one("text", cfg)
    msg = str(e.value)
    assert "encoders.text.sha256" in msg and folder_sha256(path) in msg and "make weights" in msg
    assert "\n" not in msg and "`unpinned`" in msg
    assert build_one("text", {**cfg, "sha256": "unpinned"}).dim == 32
    run = tmp_path / "run"
    run.mkdir()
    files = write_unpinned_record(run)
    assert str(path.resolve()) in files
    assert json.loads((run / "unpinned_models.json").read_text())["unpinned_model_files"] == files


def test_wan_vae_backend_on_a_tiny_random_init(tmp_path):
    import diffusers
    torch.manual_seed(0)
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
    vae = diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=mean, latents_std=std
    )
    vae.save_pretrained(tmp_path / "wan")
    pin = folder_sha256(tmp_path / "wan")
    enc = build_one("vae", {"backend": "wan_vae", "path": str(tmp_path / "wan"), "sha256": pin})
    assert (enc.latent_channels, enc.spatial_factor, enc.temporal_factor) == (4, 8, 4)
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    z = enc.encode(video)
    assert z.shape == (1, 4, 2, 4, 4)  # 1 + (5 - 1) / 4 latent frames
    with torch.no_grad():
        raw = vae.encode(video).latent_dist.mode()
    torch.testing.assert_close(
        z, (raw - torch.tensor(mean).view(1, 4, 1, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1, 1)
    )
    assert enc.decode(z).shape == (1, 3, 5, 32, 32)
    assert enc.encode_image(video[:, :, 0]).shape == (1, 4, 4, 4)


def test_open_clip_backend_on_a_tiny_custom_arch(tmp_path):
    import open_clip

    arch = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    cfg_path = tmp_path / "TinyViT-test.json"
    cfg_path.write_text(json.dumps(arch))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model = open_clip.create_model("TinyViT-test")
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    enc = build_one(
        "image",
        {
            "backend": "open_clip",
            "arch": "TinyViT-test",
            "path": str(tmp_path / "tiny.pt"),
            "sha256": sha256_file(tmp_path / "tiny.pt"),
            "model_config": str(cfg_path),
        },
    )
    assert enc.dim == 32 and enc.image_size == 32
    imgs = torch.cat([photo("chelsea", 32), photo("coffee", 32)])
    feats = enc.encode(imgs)
    assert feats.shape == (2, 32)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():  # the checkpoint really loaded: same features as the saved model
        want = model.eval().encode_image((imgs - mean) / std)
    torch.testing.assert_close(feats, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_the_trainer_run_folder_names_the_files_it_loaded_unpinned(tmp_path, triplet_shards):
    """A training run whose text encoder is configured `sha256: unpinned` writes unpinned_models.json in its
    run folder, and its summary names the same files."""
    import copy

    import yaml

    from curation.models import package_file
    from tests.training.conftest import TINY
    from training.config import load_config
    from training.encoders import MINILM_FILE, MINILM_PACKAGE, MINILM_SHA256
    from training.loop import train

    minilm = package_file(MINILM_PACKAGE, MINILM_FILE, MINILM_SHA256).parent
    data = copy.deepcopy(TINY)
    data["encoders"]["text"] = {
        "backend": "hf_text",
        "path": str(minilm),
        "sha256": "unpinned",
        "max_length": 16,
    }
    data["phases"] = [dict(TINY["phases"][0], steps=1)]
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    out = train(
        load_config(tmp_path / "t.yaml", {"data.shards": str(triplet_shards), "log.out_dir": str(run)})
    )
    recorded = json.loads((run / "unpinned_models.json").read_text())["unpinned_model_files"]
    assert str(minilm.resolve()) in recorded and recorded == out["unpinned_model_files"]
