"""Reference-image geometry for the image encoder: pad a crop to a square so the resize keeps its aspect."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_to_square(img: torch.Tensor, fill: float | Sequence[float] | torch.Tensor = 1.0) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, S, S) with S = max(H, W): the image centred, the border filled with `fill`.

    CLIP-style encoders take a square input; resizing a 480x832 reference straight to 224x224 squashes
    the subject, so pad first and resize after. `fill` is one value or one per channel, in the image's
    own range (1.0 = white for [0, 1] images, the colour the loader letterboxes references with). The
    offset is (S - H) // 2, (S - W) // 2, as the loader's letterbox. Dtype and device are kept.
    """
    if img.dim() != 4 or img.shape[1] != 3:
        raise ValueError(f"pad_to_square expects (N, 3, H, W), got {tuple(img.shape)}")
    N, C, H, W = img.shape
    if H == 0 or W == 0:
        raise ValueError(f"pad_to_square got an empty image {tuple(img.shape)}")
    fill_t = torch.as_tensor(fill, dtype=torch.float64).flatten()
    if fill_t.numel() not in (1, C):
        raise ValueError(f"fill needs 1 or {C} values, got {fill_t.numel()}")
    if H == W:
        return img
    S = max(H, W)
    out = torch.empty(N, C, S, S, dtype=img.dtype, device=img.device)
    out.copy_(fill_t.expand(C).view(1, C, 1, 1).expand(N, C, S, S))  # cast to img's dtype (e.g. uint8)
    top, left = (S - H) // 2, (S - W) // 2
    out[:, :, top : top + H, left : left + W] = img
    return out
