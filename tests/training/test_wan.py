"""Phantom-Wan with tiny random-init models of the real classes: conditioning, loss, layouts, LoRA."""

from __future__ import annotations

import hashlib

import pytest
import torch

from curation.models import ModelUnpinned
from model.flow import Conditioning, rf_loss
from model.phantom_wan import (
    WAN_LOSS_ARGS,
    PhantomWan,
    build_wan_transformer,
    condition_dropout,
    detect_layout,
    diffusers_to_original,
    guided_sample,
    original_to_diffusers,
    release_schedule,
    wan_transformer_config,
)
from training.config import load_config
from training.wan import build_phantom_wan, save_original_layout

C, TEXT_DIM = 4, 32


def _transformer(seed=0, **kw):
    torch.manual_seed(seed)
    return build_wan_transformer("tiny", in_channels=C, out_channels=C, text_dim=TEXT_DIM, **kw)


def _batch(B=2, n=2, T=2, h=4, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, C, T, h, w, generator=g)
    cond = Conditioning(
        text=torch.randn(B, 5, TEXT_DIM, generator=g),
        text_mask=torch.ones(B, 5, dtype=torch.bool),
        ref_latents=torch.randn(B, n, C, h, w, generator=g),
        ref_clip=torch.randn(B, n, 8, generator=g),
        ref_mask=torch.ones(B, n, dtype=torch.bool),
    )
    return x0, cond


# Names of one block and the top level of the original WanModel (Wan2.1 wan/modules/model.py), as in
# Wan2.1-T2V-1.3B's diffusion_pytorch_model.safetensors and Phantom-Wan-1.3B.pth.
ORIGINAL_TOP = {
    "patch_embedding.weight", "patch_embedding.bias",
    "text_embedding.0.weight", "text_embedding.0.bias", "text_embedding.2.weight", "text_embedding.2.bias",
    "time_embedding.0.weight", "time_embedding.0.bias", "time_embedding.2.weight", "time_embedding.2.bias",
    "time_projection.1.weight", "time_projection.1.bias", "head.head.weight", "head.head.bias",
    "head.modulation",
}  # fmt: skip
ORIGINAL_BLOCK = {
    "modulation", "norm3.weight", "norm3.bias", "ffn.0.weight", "ffn.0.bias", "ffn.2.weight", "ffn.2.bias",
    *(f"{a}.{p}.{t}" for a in ("self_attn", "cross_attn") for p in "qkvo" for t in ("weight", "bias")),
    *(f"{a}.norm_{p}.weight" for a in ("self_attn", "cross_attn") for p in "qk"),
}  # fmt: skip


def test_key_conversion_round_trips_and_names_the_original_layout():
    model = _transformer()
    state = model.state_dict()
    original = diffusers_to_original(state)
    expected = ORIGINAL_TOP | {f"blocks.{i}.{k}" for i in range(2) for k in ORIGINAL_BLOCK}
    assert set(original) == expected
    assert original["head.modulation"].shape == (1, 2, 24) and original["blocks.0.modulation"].shape == (
        1,
        6,
        24,
    )
    assert detect_layout(original) == "original" and detect_layout(state) == "diffusers"
    back = original_to_diffusers({f"model.diffusion_model.{k}": v for k, v in original.items()})
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    i2v = _transformer(image_dim=16, added_kv_proj_dim=24).state_dict()  # the I2V variant's extra keys
    i2v_original = diffusers_to_original(i2v)
    extra = {
        "img_emb.proj.0.weight",
        "blocks.1.cross_attn.k_img.weight",
        "blocks.0.cross_attn.norm_k_img.weight",
    }
    assert extra <= set(i2v_original) and set(original_to_diffusers(i2v_original)) == set(i2v)
    with pytest.raises(ValueError, match="no known Wan layout"):
        original_to_diffusers({**original, "blocks.0.extra.weight": torch.zeros(1)})


def test_original_layout_checkpoint_loads_and_gives_the_same_output(tmp_path):
    """A Phantom-Wan checkpoint written in the original layout (.pth, like Phantom-Wan-1.3B.pth) loads into
    the diffusers model through the YAML keys, sha256-pinned, and reproduces the source model's output."""
    source = PhantomWan(_transformer(seed=1), text_len=8).eval()
    path = save_original_layout(source.transformer, tmp_path / "Phantom-Wan-tiny.pth")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    overrides = {"model.family": "phantom_wan", "model.preset": "tiny", "model.wan.text_len": 8,
                 "model.overrides": {"in_channels": C, "out_channels": C, "text_dim": TEXT_DIM},
                 "model.wan.phantom_ckpt": str(path), "model.wan.phantom_sha256": sha}  # fmt: skip
    loaded = build_phantom_wan(load_config(None, overrides).model).eval()
    x0, cond = _batch()
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        assert torch.equal(loaded(x0, t, **cond.as_kwargs()).video, source(x0, t, **cond.as_kwargs()).video)
    fresh = build_phantom_wan(
        load_config(None, {k: v for k, v in overrides.items() if "phantom" not in k}).model
    )
    with torch.no_grad():
        assert not torch.allclose(
            fresh(x0, t, **cond.as_kwargs()).video, source(x0, t, **cond.as_kwargs()).video
        )
    from curation.models import ModelHashMismatch

    with pytest.raises(ModelHashMismatch):
        build_phantom_wan(load_config(None, dict(overrides, **{"model.wan.phantom_sha256": "0" * 64})).model)
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="phantom_sha256"):
        load_config(None, dict(overrides, **{"model.wan.phantom_sha256": None}))


def test_references_are_clean_inputs_and_out_of_the_loss():
    """The transformer sees [noisy video | clean reference latents] along frames; only video is scored."""
    model = PhantomWan(_transformer(), text_len=8)
    x0, cond = _batch(n=2, T=2)
    seen = {}

    def hook(module, args, kwargs, out):
        seen["input"] = args[0] if args else kwargs["hidden_states"]
        out[0].retain_grad()
        seen["output"] = out[0]

    model.transformer.register_forward_hook(hook, with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    loss, info = rf_loss(model, x0, cond, generator=g, **WAN_LOSS_ARGS)
    loss.backward()
    inp, out = seen["input"], seen["output"]
    assert inp.shape[2] == 2 + 2  # T video frames + n reference frames
    assert torch.equal(inp[:, :, 2:], cond.ref_latents.transpose(1, 2))  # references never noised
    assert not torch.equal(inp[:, :, :2], x0)  # the video is
    assert out.grad[:, :, 2:].abs().max() == 0  # reference frames contribute nothing to the loss
    assert out.grad[:, :, :2].abs().max() > 0
    assert ((info["t"] > 0) & (info["t"] < 1)).all()


def test_shift_moves_training_timesteps_to_high_noise():
    model = PhantomWan(_transformer(), text_len=8)
    x0, cond = _batch(B=64, n=1, h=2, w=2)
    with torch.no_grad():
        _, plain = rf_loss(model, x0, cond, generator=torch.Generator().manual_seed(0), t_mode="uniform")
        _, shifted = rf_loss(model, x0, cond, generator=torch.Generator().manual_seed(0), **WAN_LOSS_ARGS)
    assert torch.all(shifted["t"] >= plain["t"]) and shifted["t"].mean() > plain["t"].mean() + 0.15


def test_mixed_reference_counts_equal_separate_runs():
    model = PhantomWan(_transformer(), text_len=8).eval()
    x0, cond = _batch(B=3, n=3)
    cond.ref_mask[0, 1:] = False  # 1 reference
    cond.ref_mask[1, 2:] = False  # 2 references
    t = torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        joint = model(x0, t, **cond.as_kwargs()).video
        for i, n in enumerate((1, 2, 3)):
            alone = model(
                x0[i : i + 1], t[i : i + 1], cond.text[i : i + 1], ref_latents=cond.ref_latents[i : i + 1, :n]
            )
            torch.testing.assert_close(joint[i : i + 1], alone.video, rtol=1e-5, atol=1e-6)


def test_condition_dropout_zeroes_refs_but_keeps_slots():
    _, cond = _batch(B=400, n=2, h=2, w=2)
    out = condition_dropout(
        cond, p_text=0.2, p_image=0.2, p_both=0.1, generator=torch.Generator().manual_seed(0)
    )
    text_off = out.text.abs().flatten(1).sum(1) == 0
    refs_off = out.ref_latents.abs().flatten(1).sum(1) == 0
    assert out.ref_mask.all()  # slots stay: the model sees zero frames, as in the release's negative branch
    both = (text_off & refs_off).float().mean()
    assert 0.05 < both < 0.16 and 0.12 < (text_off & ~refs_off).float().mean() < 0.3  # rough rates


def test_one_batch_overfits():
    torch.manual_seed(0)
    model = PhantomWan(_transformer(), text_len=8)
    x0, cond = _batch(B=2, n=1, h=4, w=4)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.4, 0.7])
    noise = torch.randn(x0.shape, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss, _ = rf_loss(model, x0, cond, t=t, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::10]


def test_guidance_weights_pick_the_branches():
    """w_img = w_txt = 0 samples the unconditional branch alone; w_img = w_txt = 1 the conditional one."""
    model = PhantomWan(_transformer(), text_len=8).eval()
    x0, cond = _batch(B=1, n=1, h=4, w=4)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    full = guided_sample(model, cond, x0.shape, steps=3, w_img=1, w_txt=1, noise=noise, solver="euler")
    uncond = guided_sample(model, cond, x0.shape, steps=3, w_img=0, w_txt=0, noise=noise, solver="euler")
    s, ts = release_schedule(3, 5.0)
    s = s.float()
    x = noise.clone()
    with torch.no_grad():
        for i in range(3):
            v = model(x, s[i].expand(1), timestep=ts[i].expand(1), **cond.as_kwargs()).video
            x = x + (s[i + 1] - s[i]) * v
    torch.testing.assert_close(full, x, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(full, uncond)


class StraightFlow(torch.nn.Module):
    """The exact velocity field of the straight path from noise to a known x0: v = (x_t - x0) / t."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, t, text, text_mask=None, ref_latents=None, ref_clip=None, ref_mask=None, **_):
        from model.phantom_wan import WanOutput

        x0 = self.x0.repeat(x.shape[0] // self.x0.shape[0], 1, 1, 1, 1)
        return WanOutput(video=(x - x0) / t.view(-1, 1, 1, 1, 1))


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_solvers_integrate_the_shifted_flow_to_the_data(solver):
    """On a field whose exact solution is known, both solvers land on x0 (all three guidance branches agree,
    so any weights), so the shifted UniPC schedule and the Euler one are wired right."""
    x0, cond = _batch(B=1, n=1, h=4, w=4)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    out = guided_sample(
        StraightFlow(x0), cond, x0.shape, steps=6, w_img=3, w_txt=7.5, noise=noise, solver=solver
    )
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)


def test_lora_trains_adapters_only(tmp_path):
    overrides = {"model.family": "phantom_wan", "model.preset": "tiny", "model.wan.text_len": 8,
                 "model.overrides": {"in_channels": C, "out_channels": C, "text_dim": TEXT_DIM},
                 "model.wan.finetune": "lora", "model.wan.lora": {"rank": 4, "alpha": 4}}  # fmt: skip
    torch.manual_seed(0)
    model = build_phantom_wan(load_config(None, overrides).model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x0, cond = _batch(n=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = rf_loss(model, x0, cond, generator=torch.Generator().manual_seed(0), **WAN_LOSS_ARGS)
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(trainable)


def test_wan_configs_load_and_name_the_family():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[2] / "configs"
    small, big = load_config(configs / "phantom_wan_1.3b.yaml"), load_config(configs / "phantom_wan_14b.yaml")
    assert (small.model.family, small.model.wan.finetune, big.model.wan.finetune) == (
        "phantom_wan",
        "full",
        "full",
    )
    assert (small.scaling.sp_degree, big.scaling.sp_degree, big.scaling.num_workers) == (1, 8, 16)
    assert [p.buckets[0] for p in big.phases] == [[256, 448], [480, 832], [720, 1280]]
    assert (
        small.log.checkpoint_format == big.log.checkpoint_format == "dcp" and small.model.wan.grad_checkpoint
    )
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="model.family"):
        load_config(None, {"model.family": "sora"})


def test_family_records_carry_what_each_family_does_differently():
    """One record per family, picked once: the loss, dropout, sampler and checkpoint scope of each."""
    from model.flow import apply_condition_dropout, euler_sample
    from training.models import family

    mmdit = family(load_config(None, {"model.preset": "tiny"}))
    assert (mmdit.name, mmdit.loss, mmdit.dropout) == ("mmdit", rf_loss, apply_condition_dropout)
    assert mmdit.sample is euler_sample and not mmdit.adapters_only
    cfg = load_config(None, {"model.family": "phantom_wan", "model.wan.sample_shift": 3.0,
                             "model.wan.sample_solver": "euler", "model.wan.finetune": "lora"})  # fmt: skip
    wan = family(cfg)
    assert wan.loss.func is rf_loss and wan.loss.keywords == {"t_mode": "uniform", "shift": 5.0}
    assert wan.dropout is condition_dropout and wan.adapters_only
    assert wan.sample.func is guided_sample and wan.sample.keywords == {"shift": 3.0, "solver": "euler"}
    from training.config import WAN_NEGATIVE_PROMPT

    assert wan.negative_prompt == WAN_NEGATIVE_PROMPT and mmdit.negative_prompt is None
    cfg.model.wan.negative_prompt = None  # `negative_prompt: null` in the YAML: the all-zero null text
    assert family(cfg).negative_prompt is None
    cfg.model.family = "sora"
    with pytest.raises(ValueError, match="'mmdit', 'phantom_wan'"):
        family(cfg)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wan_cfg(**wan):
    overrides = {"model.family": "phantom_wan", "model.preset": "tiny", "model.wan.text_len": 8,
                 "model.overrides": {"in_channels": C, "out_channels": C, "text_dim": TEXT_DIM}}  # fmt: skip
    overrides.update({f"model.wan.{k}": v for k, v in wan.items()})
    return load_config(None, overrides).model


def test_base_weights_from_a_diffusers_folder_and_a_sharded_original_folder(tmp_path):
    import json

    from safetensors.torch import save_file

    source = PhantomWan(_transformer(seed=2), text_len=8).eval()
    x0, cond = _batch()
    t = torch.tensor([0.5, 0.1])
    with torch.no_grad():
        want = source(x0, t, **cond.as_kwargs()).video
    source.transformer.save_pretrained(str(tmp_path / "diffusers"))  # the Wan2.1-*-Diffusers layout
    name = "diffusion_pytorch_model.safetensors"
    pins = {name: _sha(tmp_path / "diffusers" / name)}
    loaded = build_phantom_wan(_wan_cfg(weights=str(tmp_path / "diffusers"), weights_sha256=pins)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x0, t, **cond.as_kwargs()).video, want)

    original = diffusers_to_original(source.transformer.state_dict())  # the original Wan folder layout
    folder = tmp_path / "original"
    folder.mkdir()
    keys = sorted(original)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        fname = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: original[k].contiguous() for k in part}, str(folder / fname))
        weight_map |= dict.fromkeys(part, fname)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map})
    )
    pins = {f: _sha(folder / f) for f in set(weight_map.values())}
    loaded = build_phantom_wan(_wan_cfg(weights=str(folder), weights_sha256=pins)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x0, t, **cond.as_kwargs()).video, want)
    one = dict(list(pins.items())[:1])
    with pytest.raises(ModelUnpinned, match=r"no pinned sha256.*model\.wan\.weights_sha256.*`unpinned`"):
        build_phantom_wan(_wan_cfg(weights=str(folder), weights_sha256=one))  # a shard left out of the pins
    with pytest.raises(ValueError, match="shapes differ"):  # a 1.3B file into the tiny preset, say
        build_phantom_wan(
            load_config(None, {"model.family": "phantom_wan", "model.preset": "tiny",
                               "model.wan.weights": str(folder), "model.wan.weights_sha256": pins}).model
        )  # fmt: skip


def test_lora_starts_equal_to_the_base():
    torch.manual_seed(5)
    base = build_phantom_wan(_wan_cfg()).eval()
    torch.manual_seed(5)
    adapted = build_phantom_wan(_wan_cfg(finetune="lora", lora={"rank": 4, "alpha": 4})).eval()
    x0, cond = _batch()
    t = torch.tensor([0.5, 0.9])
    with torch.no_grad():
        assert torch.equal(base(x0, t, **cond.as_kwargs()).video, adapted(x0, t, **cond.as_kwargs()).video)


def test_sample_does_not_import_the_loop():
    """loop -> sample -> models, one way: sampling (and evaluation) never pulls in the training loop."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, training.sample; assert 'training.loop' not in sys.modules, sorted(sys.modules)"
    subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], check=True, timeout=120
    )


def test_yaml_overrides_resize_a_preset():
    """model.overrides wins over the preset's own sizes (num_layers, freq_dim) instead of raising."""
    cfg = wan_transformer_config("tiny", num_layers=3, freq_dim=16, in_channels=C)
    sizes = (cfg["num_layers"], cfg["freq_dim"], cfg["in_channels"], cfg["num_attention_heads"])
    assert sizes == (3, 16, C, 2)
    model = build_phantom_wan(_wan_cfg_with({"num_layers": 1, "freq_dim": 16, "ffn_dim": 40}))
    assert len(model.transformer.blocks) == 1 and model.transformer.config.freq_dim == 16
    assert model.transformer.blocks[0].ffn.net[2].in_features == 40
    with pytest.raises(TypeError, match="num_blocks"):
        build_phantom_wan(_wan_cfg_with({"num_blocks": 1}))


def _wan_cfg_with(sizes):
    over = {"in_channels": C, "out_channels": C, "text_dim": TEXT_DIM, **sizes}
    overrides = {"model.family": "phantom_wan", "model.preset": "tiny", "model.overrides": over}
    return load_config(None, overrides).model


class RecordingWan(PhantomWan):
    """PhantomWan that keeps the text states of every call: rows neg, pos_i, pos_it of guided_sample."""

    def forward(self, x, t, text, *args, **kwargs):
        self.texts.append(text.detach().clone())
        return super().forward(x, t, text, *args, **kwargs)


def test_generate_encodes_the_negative_prompt_as_the_null_text(tmp_path):
    """training.sample.generate: the null text is the encoded negative prompt (the release's by default),
    zero past its real tokens; `negative_prompt: null` gives the all-zero context."""
    from tests.training.wan_assets import TEXT_DIM as ASSET_TEXT_DIM
    from tests.training.wan_assets import VAE_Z, write_tiny_wan_assets
    from training.config import WAN_NEGATIVE_PROMPT
    from training.encoders import build_encoders
    from training.sample import generate

    assets = write_tiny_wan_assets(tmp_path)
    from curation.models import folder_sha256

    enc = build_encoders({"vae": {"backend": "wan_vae", "path": str(assets["vae"]),
                                  "sha256": folder_sha256(assets["vae"])},
                          "text": {"backend": "hf_text", "path": str(assets["umt5"]), "max_length": 24,
                                   "sha256": folder_sha256(assets["umt5"])},
                          "image": {"backend": "mobilenet_v2", "image_size": 32}})  # fmt: skip
    sizes = {"in_channels": VAE_Z, "out_channels": VAE_Z, "text_dim": ASSET_TEXT_DIM}
    cfg = load_config(None, {"model.family": "phantom_wan", "model.preset": "tiny", "model.wan.text_len": 24,
                             "model.overrides": sizes})  # fmt: skip
    torch.manual_seed(0)
    model = RecordingWan(build_wan_transformer("tiny", **sizes), text_len=24).eval()
    g = torch.Generator().manual_seed(0)
    refs = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=g)
    videos = []
    for negative in (WAN_NEGATIVE_PROMPT, "blurry, static", None):
        cfg.model.wan.negative_prompt = negative
        model.texts = []
        videos.append(generate(model, enc, refs, "a cat", num_frames=5, steps=2, seed=1, cfg=cfg))
        assert len(model.texts) == 2 and model.texts[0].shape[0] == 3  # one batch of 3 branches a step
        null = model.texts[0][1]  # (L, D): the pos_i branch
        if negative is None:
            assert null.abs().max() == 0
        else:
            want = enc.text.encode([negative])[0][0]  # (L_neg, D)
            assert torch.equal(null[: len(want)], want) and not null[len(want) :].any()
            assert torch.equal(model.texts[0][0], null)  # the neg branch shares the null text
    assert not (videos[0] == videos[2]).all() and not (videos[1] == videos[2]).all()


def test_planner_on_the_presets_allocates_nothing_and_refuses_what_cannot_fit(capsys):
    """The plans printed in the presets' comments, from training/run.py --plan; SP=1 at 720p is refused."""
    from pathlib import Path

    from training.config import ConfigError
    from training.plan import check, plan
    from training.run import main

    configs = Path(__file__).resolve().parents[2] / "configs"
    big = load_config(configs / "phantom_wan_14b.yaml")
    p720 = plan(big)[-1]
    assert (p720.tokens, p720.tokens_per_rank) == (25 * 45 * 80, 11_250)  # 21 video + 4 reference frames
    assert round(p720.total_gb, 1) == 23.4 and round(p720.activations_gb, 2) == 7.76
    assert main(["--config", str(configs / "phantom_wan_14b.yaml"), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "16 ranks = dp 2 x sp 8" in out and "90,000 tokens/sample, 11,250 per rank" in out
    args = ["--config", str(configs / "phantom_wan_14b.yaml"), "--plan"]
    assert main([*args, "--set", "scaling.sp_degree=1"]) == 3
    assert "DOES NOT FIT" in capsys.readouterr().out
    fits, text = check(load_config(configs / "phantom_wan_1.3b.yaml"))
    assert fits and "39,000 tokens/sample, 39,000 per rank" in text and "-> 14.0 of 80 GB" in text
    # SP=8 cuts the activations 8-fold at the same tokens; the states do not change
    one = plan(load_config(configs / "phantom_wan_14b.yaml", {"scaling.sp_degree": 1}))[-1]
    assert one.states_gb == p720.states_gb and one.activations_gb > 7.9 * p720.activations_gb
    with pytest.raises(ConfigError, match="sp_degree"):
        load_config(None, {"scaling.num_workers": 4, "scaling.sp_degree": 3, "scaling.strategy": "fsdp"})
    with pytest.raises(ConfigError, match="fsdp"):
        load_config(None, {"scaling.num_workers": 2, "scaling.sp_degree": 2})
