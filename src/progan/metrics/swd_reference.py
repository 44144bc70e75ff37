"""Sliced Wasserstein distance (paper §5, Appendix D) in plain numpy/scipy: the reference for swd.py.

A direct port of the official `metrics/sliced_wasserstein.py` (tkarras/progressive_growing_of_gans):
Laplacian pyramid with scipy.ndimage.convolve (mode='mirror', the 5x5 [1,4,6,4,1]^2/256 kernel),
random 7x7x3 neighbourhoods, per-channel normalisation, sorted random projections. It is slow
(scipy convolution, single-threaded np.sort) and holds every descriptor of every level in RAM, as the
official code does; swd.py is the one the pipeline runs, and tests check the two agree.

The random choices are explicit so both implementations make the same ones:
- `draw_centres(seed, side, level, start, stop, ...)`: neighbourhood centres for images start..stop-1,
  drawn per block of 64 images from their own seed, so they do not depend on the batch size;
- `draw_directions(seed, level, ...)`: unit Gaussian directions, [repeats, dim, per_repeat].
Deviations from the official code (none change what is measured): the descriptor layout is
(channel, y, x) (official: (channel, x, y); irrelevant for isotropic directions); the random numbers
come from seeded numpy Generators instead of the global np.random state; a channel with std 0 (a constant
image set) is left at 0 instead of becoming NaN.
"""
from __future__ import annotations

import numpy as np
import scipy.ndimage

NHOOD_PX = 7                # official nhood_size
MIN_LEVEL_PX = 16           # official: pyramid levels while res >= 16; the 16 px level is the low-pass residual
CENTRE_BLOCK_IMAGES = 64    # centres are drawn per block of this many images (batch-size independent)
_SIDE_STREAMS = 2           # side 0 = first set (reals), 1 = second set (fakes)
_DIRECTIONS_TAG = 7         # keeps the direction stream apart from the centre streams

KERNEL_5X5 = (np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0).astype(np.float32)   # official gaussian_filter


def level_sizes_px(res_px: int) -> list[int]:
    """SWD pyramid levels: [res, res/2, ..., 16]; the last one is the low-pass residual.

    Below 16 px (the 4 and 8 px stages) there is one level: the image itself, treated as the residual.
    """
    res_px = int(res_px)
    sizes = [res_px]
    while sizes[-1] > MIN_LEVEL_PX:
        sizes.append(sizes[-1] // 2)
    return sizes


def nhood_px(level_px: int) -> int:
    """Neighbourhood side: 7 as in the paper; 3 at a 4 px level, where a 7x7 patch does not fit."""
    return NHOOD_PX if level_px >= NHOOD_PX + 1 else 3


def draw_centres(seed: int, side: int, level: int, start: int, stop: int, level_px: int,
                 per_image: int) -> np.ndarray:
    """Neighbourhood centres (y, x) for images start..stop-1: int64 [stop - start, per_image, 2].

    Uniform in [h, level_px - h) like the official `np.random.randint(H, S - H)`, h = nhood // 2, so the
    neighbourhood lies inside the image. Each block of CENTRE_BLOCK_IMAGES images has its own seed
    (seed, side, level, block): the centres of image i do not depend on how images are batched.
    """
    if not 0 <= side < _SIDE_STREAMS:
        raise ValueError(f"side must be 0 or 1, got {side}")
    h = nhood_px(level_px) // 2
    first, last = start // CENTRE_BLOCK_IMAGES, (stop - 1) // CENTRE_BLOCK_IMAGES
    blocks = [np.random.default_rng([seed, side, level, b]).integers(h, level_px - h,
                                                                      size=(CENTRE_BLOCK_IMAGES, per_image, 2))
              for b in range(first, last + 1)] if stop > start else [np.zeros((0, per_image, 2), np.int64)]
    all_blocks = np.concatenate(blocks, axis=0)
    offset = start - first * CENTRE_BLOCK_IMAGES
    return all_blocks[offset:offset + (stop - start)].astype(np.int64)


def draw_directions(seed: int, level: int, dim: int, repeats: int, per_repeat: int) -> np.ndarray:
    """Random unit directions, float32 [repeats, dim, per_repeat] (official: randn, normalise, float32)."""
    rng = np.random.default_rng([seed, _DIRECTIONS_TAG, level])
    dirs = rng.standard_normal((repeats, dim, per_repeat))
    dirs /= np.sqrt(np.sum(np.square(dirs), axis=1, keepdims=True))
    return dirs.astype(np.float32)


# ---- Laplacian pyramid (official pyr_down / pyr_up, "matches cv2.pyrDown()/pyrUp()") ------------------

def pyr_down(x: np.ndarray) -> np.ndarray:
    """[N, C, H, W] float32 -> [N, C, H/2, W/2]: 5x5 blur with mirror padding, keep every second pixel."""
    return scipy.ndimage.convolve(x, KERNEL_5X5[None, None], mode="mirror")[:, :, ::2, ::2]


def pyr_up(x: np.ndarray) -> np.ndarray:
    """[N, C, H, W] float32 -> [N, C, 2H, 2W]: insert zeros, 5x5 blur x4 with mirror padding."""
    n, c, h, w = x.shape
    z = np.zeros((n, c, 2 * h, 2 * w), x.dtype)
    z[:, :, ::2, ::2] = x
    return scipy.ndimage.convolve(z, KERNEL_5X5[None, None] * 4.0, mode="mirror")


def laplacian_pyramid(x: np.ndarray, num_levels: int) -> list[np.ndarray]:
    """[N, C, H, W] -> num_levels band-pass levels, the last is the low-pass residual (float32)."""
    levels = [np.float32(x)]
    for _ in range(1, num_levels):
        levels.append(pyr_down(levels[-1]))
        levels[-2] = levels[-2] - pyr_up(levels[-1])
    return levels


# ---- descriptors and distance --------------------------------------------------------------------------

def get_descriptors(level: np.ndarray, centres: np.ndarray, nhood: int) -> np.ndarray:
    """[N, C, S, S] level, centres [N, P, 2] (y, x) -> [N * P, C, nhood, nhood] neighbourhoods."""
    n, c, s, _ = level.shape
    p = centres.shape[1]
    h = nhood // 2
    off = np.arange(-h, h + 1)
    img = np.repeat(np.arange(n), p)[:, None, None, None]                       # [N*P, 1, 1, 1]
    chan = np.arange(c)[None, :, None, None]
    y = centres[:, :, 0].reshape(-1)[:, None, None, None] + off[None, None, :, None]
    x = centres[:, :, 1].reshape(-1)[:, None, None, None] + off[None, None, None, :]
    return level[img, chan, y, x]


def finalize_descriptors(desc: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """Normalise each colour channel to mean 0, std 1 over the whole set; flatten to [M, C * k * k]."""
    if isinstance(desc, list):
        desc = np.concatenate(desc, axis=0)
    desc = desc.astype(np.float32)
    desc -= np.mean(desc, axis=(0, 2, 3), keepdims=True)
    std = np.std(desc, axis=(0, 2, 3), keepdims=True)
    desc /= np.where(std > 0, std, 1.0)     # deviation: a constant channel gives 0, not NaN (official: NaN)
    return desc.reshape(desc.shape[0], -1)


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, directions: np.ndarray) -> float:
    """Mean over repeats of mean |sort(a @ dir) - sort(b @ dir)| (a, b [M, D]; directions [R, D, K])."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"descriptor sets must have the same [M, D] shape, got {a.shape} and {b.shape}")
    results = []
    for dirs in directions:
        proj_a = np.sort(np.matmul(a, dirs), axis=0)    # [M, K], each column sorted
        proj_b = np.sort(np.matmul(b, dirs), axis=0)
        results.append(np.mean(np.abs(proj_a - proj_b)))
    return float(np.mean(results))


def level_descriptors(images, side: int, *, seed: int, per_image: int, batch: int) -> list[np.ndarray]:
    """Every level's finalized descriptors of uint8 images [N, R, R, 3] (array or memmap)."""
    n, res = len(images), int(images.shape[1])
    sizes = level_sizes_px(res)
    out: list[list[np.ndarray]] = [[] for _ in sizes]
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        x = np.asarray(images[start:stop]).transpose(0, 3, 1, 2)                   # [B, 3, R, R]
        for li, level in enumerate(laplacian_pyramid(x, len(sizes))):
            centres = draw_centres(seed, side, li, start, stop, sizes[li], per_image)
            out[li].append(get_descriptors(level, centres, nhood_px(sizes[li])))
    return [finalize_descriptors(d) for d in out]


def swd(reals, fakes, *, descriptors_per_image: int = 128, directions: int = 128, repeats: int = 4,
        seed: int = 0, batch: int = 64) -> dict[str, float]:
    """SWD x1e3 per level and their mean: {"swd_<px>": ..., "swd_avg": ...} (official API.end)."""
    if len(reals) != len(fakes) or reals.shape[1:] != fakes.shape[1:]:
        raise ValueError(f"need the same number and size of images, got {reals.shape} and {fakes.shape}")
    sizes = level_sizes_px(int(reals.shape[1]))
    da = level_descriptors(reals, 0, seed=seed, per_image=descriptors_per_image, batch=batch)
    db = level_descriptors(fakes, 1, seed=seed, per_image=descriptors_per_image, batch=batch)
    result = {}
    for li, size in enumerate(sizes):
        dirs = draw_directions(seed, li, da[li].shape[1], repeats, directions)
        result[f"swd_{size}"] = sliced_wasserstein(da[li], db[li], dirs) * 1e3
    result["swd_avg"] = float(np.mean([result[f"swd_{s}"] for s in sizes]))
    return result
