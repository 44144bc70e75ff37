"""MS-SSIM (Wang et al. 2003) in torch, as the official `metrics/ms_ssim.py` (tkarras/progressive_growing_of_gans,
adapted there from tensorflow/models `research/compression/image_encoder/msssim.py`). Paper §5 reports it on
pairs of generated images as a variation measure (lower = more varied).

Per pair of uint8 RGB images: 5 scales with weights [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]; at each
scale an 11x11 Gaussian window (sigma 1.5; both shrink to the image when it is smaller: size = min(11, S),
sigma = size * 1.5 / 11), 'valid' filtering, k1 0.01, k2 0.03, max_val 255; contrast-structure `cs` at
scales 1-4 and the full SSIM at scale 5, each clipped at 0, combined as prod cs_i^w_i * ssim_5^w_5;
then 2x2 box downsampling. Scores are averaged over pairs (the official averages per minibatch, weighted
by pairs: the same thing).

Batched, on CUDA when present. The Gaussian filtering is a product with [S - size + 1, S] band matrices
(the window is separable), the same trick as swd.py.
Deviation: below 16 px five 2x2 downsamplings do not fit (the official code returns NaN); an R px image
uses log2(R) + 1 scales (3 at 4 px, 4 at 8 px) with the first weights of the list.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)   # official: "don't sum to 1.0 but do match the paper"
FILTER_SIZE = 11
FILTER_SIGMA = 1.5
K1, K2 = 0.01, 0.03
MAX_VAL = 255.0


def num_scales(res_px: int) -> int:
    """5, or log2(res_px) + 1 below 16 px (see the module docstring)."""
    return min(len(WEIGHTS), int(math.log2(res_px)) + 1)


def gaussian_1d(size: int, sigma: float) -> np.ndarray:
    """1-D factor of the official `_FSpecialGauss` (MATLAB fspecial): even sizes sit at half-pixel offsets."""
    radius = size // 2
    offset, stop = (0.5, radius) if size % 2 == 0 else (0.0, radius + 1)
    x = np.arange(-radius + offset, stop, 1.0)
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


@lru_cache(maxsize=16)
def _window_matrix(s: int, device: torch.device) -> torch.Tensor:
    """[s - size + 1, s]: 'valid' Gaussian filtering of one axis (window size min(11, s), official sigma)."""
    size = min(FILTER_SIZE, s)
    g = gaussian_1d(size, size * FILTER_SIGMA / FILTER_SIZE)
    m = np.zeros((s - size + 1, s))
    for i in range(s - size + 1):
        m[i, i:i + size] = g[::-1]     # convolution flips the window (symmetric anyway)
    return torch.from_numpy(m.astype(np.float32)).to(device)


def _ssim_cs(x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and contrast-structure per image of [N, C, S, S] float pairs: ([N], [N])."""
    g = _window_matrix(int(x1.shape[-1]), x1.device)
    # Moments about each plane's mean (variances are shift invariant): float32 sums of 255^2-sized squares
    # would cancel to ~1e-2 error; official: fftconvolve in float32, which has the same problem.
    m1, m2 = x1.mean(dim=(2, 3), keepdim=True), x2.mean(dim=(2, 3), keepdim=True)
    d1, d2 = x1 - m1, x2 - m2
    maps = torch.stack([d1, d2, d1 * d1, d2 * d2, d1 * d2])                     # [5, N, C, S, S]
    e1, e2, s11, s22, s12 = torch.matmul(g, torch.matmul(maps, g.T))            # each [N, C, T, T]
    s11, s22, s12 = s11 - e1 * e1, s22 - e2 * e2, s12 - e1 * e2
    mu1, mu2 = e1 + m1, e2 + m2
    mu11, mu22, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    c1, c2 = (K1 * MAX_VAL) ** 2, (K2 * MAX_VAL) ** 2
    v1 = 2.0 * s12 + c2
    v2 = s11 + s22 + c2
    ssim = ((2.0 * mu12 + c1) * v1 / ((mu11 + mu22 + c1) * v2)).mean(dim=(1, 2, 3))
    cs = (v1 / v2).mean(dim=(1, 2, 3))
    return ssim, cs


def _box_down(x: torch.Tensor) -> torch.Tensor:
    """2x2 box average (official _HoxDownsample)."""
    return (x[:, :, 0::2, 0::2] + x[:, :, 1::2, 0::2] + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 1::2]) * 0.25


@torch.no_grad()
def msssim_per_pair(img1, img2, device: torch.device | str | None = None) -> torch.Tensor:
    """MS-SSIM of each pair of uint8 (or 0..255 float) images [N, R, R, 3] -> float64 [N] on the CPU."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    x1 = torch.as_tensor(np.asarray(img1)).to(device).permute(0, 3, 1, 2).float()
    x2 = torch.as_tensor(np.asarray(img2)).to(device).permute(0, 3, 1, 2).float()
    if x1.shape != x2.shape or x1.shape[1] != 3 or x1.shape[2] != x1.shape[3]:
        raise ValueError(f"need two [N, R, R, 3] batches of the same shape, got {tuple(np.shape(img1))} "
                         f"and {tuple(np.shape(img2))}")
    levels = num_scales(int(x1.shape[-1]))
    weights = torch.tensor(WEIGHTS[:levels], dtype=torch.float64, device=device)
    score = torch.ones(x1.shape[0], dtype=torch.float64, device=device)
    for i in range(levels):
        ssim, cs = _ssim_cs(x1, x2)
        value = ssim if i == levels - 1 else cs                                 # cs at scales 1..L-1
        score *= value.double().clamp_min(0.0) ** weights[i]                    # official: clip to 0
        x1, x2 = _box_down(x1), _box_down(x2)
    return score.cpu()


def msssim(img1, img2, device=None) -> float:
    """Mean MS-SSIM over the pairs (img1[i], img2[i]) (official `msssim()`)."""
    return float(msssim_per_pair(img1, img2, device).mean())
