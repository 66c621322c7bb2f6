"""Tests of pad_to_square: the reference's aspect is kept for the square image-encoder input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.refs import pad_to_square


def test_wide_and_tall_images_are_centred_and_filled():
    g = torch.Generator().manual_seed(0)
    wide = torch.rand(2, 3, 4, 10, generator=g)
    out = pad_to_square(wide, fill=1.0)
    assert out.shape == (2, 3, 10, 10) and out.dtype == wide.dtype
    assert torch.equal(out[:, :, 3:7], wide)  # top = (10 - 4) // 2
    assert (out[:, :, :3] == 1).all() and (out[:, :, 7:] == 1).all()
    tall = torch.rand(1, 3, 7, 4, generator=g)
    out = pad_to_square(tall, fill=(0.1, 0.2, 0.3))  # one value per channel
    assert out.shape == (1, 3, 7, 7)
    assert torch.equal(out[:, :, :, 1:5], tall)  # left = (7 - 4) // 2
    for c, v in enumerate((0.1, 0.2, 0.3)):
        border = torch.cat([out[0, c, :, :1].flatten(), out[0, c, :, 5:].flatten()])
        assert torch.allclose(border, torch.full_like(border, v))
    square = torch.rand(1, 3, 5, 5, generator=g)
    assert torch.equal(pad_to_square(square), square)


def test_uint8_and_the_aspect_survives_the_resize():
    """A filled 48x96 rectangle, padded and resized to 32x32, covers a 16x32 box (aspect 1:2 kept); the
    plain squash would fill the whole square."""
    img = torch.zeros(1, 3, 48, 96, dtype=torch.uint8)
    out = pad_to_square(img, fill=255)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 96, 96)
    small = F.interpolate(out.float(), size=(32, 32), mode="nearest")[0, 0]
    rows = (small < 128).any(1).nonzero().flatten()
    cols = (small < 128).any(0).nonzero().flatten()
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (16, 32)


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        pad_to_square(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="fill"):
        pad_to_square(torch.zeros(1, 3, 4, 5), fill=(0.0, 1.0))
    with pytest.raises(ValueError, match="empty"):
        pad_to_square(torch.zeros(1, 3, 0, 5))


def test_image_encoder_input_is_padded_not_squashed():
    """The real offline image encoder (MobileNetV2 weights) sees a wide reference exactly as its white
    padded square, and not as the squashed image."""
    from training.encoders import MobileNetV2Encoder

    enc = MobileNetV2Encoder(image_size=64)
    g = torch.Generator().manual_seed(0)
    wide = torch.rand(2, 3, 40, 96, generator=g)  # (N, 3, H, W) in [0, 1], as the loader letterboxes
    feats = enc.encode(wide)
    torch.testing.assert_close(feats, enc.encode(pad_to_square(wide, fill=1.0)))
    squashed = F.interpolate(wide, size=(96, 96), mode="bilinear", align_corners=False)
    assert (feats - enc.encode(squashed)).abs().max() > 1e-2
