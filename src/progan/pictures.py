"""Generator output as pictures, one implementation each: the uint8 conversion and the image grid.

Used by training (samples.png), evaluation (the images SWD and MS-SSIM see), the report (grids, the interpolation
strip), `progan generate` and the Python API, so every picture of a generator is converted and laid out the same
way.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from progan.errors import ProganError


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] float, nominally [-1, 1] -> [N, H, W, C] uint8 on the CPU the official way
    (misc.convert_to_uint8 / adjust_dynamic_range, drange [-1, 1] -> [0, 255]): x * 127.5 + 127.5, rounded half
    to even (torch.round, like np.rint), clipped to [0, 255]. The result is an NHWC view of the converted NCHW
    tensor (not copied again)."""
    if x.ndim != 4:
        raise ProganError(f"to_uint8 expects images [N, C, H, W], got {list(x.shape)}")
    y = (x.detach().float() * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, columns: int | None = None, pad_px: int = 0, fill: int = 0) -> np.ndarray:
    """uint8 [N, H, W, C] -> one [rows*H, columns*W, C] image, row-major, ceil(sqrt(N)) columns by default (8 for
    64 images); `pad_px` lines of value `fill` between cells; the cells after the last image are `fill` too."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"image_grid needs [N, H, W, C] with N >= 1, got shape {list(images.shape)}")
    n, h, w, c = images.shape
    cols = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad_px) - pad_px, cols * (w + pad_px) - pad_px, c), fill, dtype=images.dtype)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * (h + pad_px):r * (h + pad_px) + h, q * (w + pad_px):q * (w + pad_px) + w] = images[i]
    return grid
