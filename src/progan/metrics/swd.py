"""Sliced Wasserstein distance (paper §5, Appendix D) in torch: batched, on CUDA when present.

Same metric as the official `metrics/sliced_wasserstein.py` (tkarras/progressive_growing_of_gans) and
its port `swd_reference.py`, with the same random choices (`draw_centres`, `draw_directions`):
- Laplacian pyramid of the uint8-range float images, 5x5 [1,4,6,4,1]^2/256 kernel, mirror padding,
  levels res, res/2, ..., 16 px; the 16 px level is the low-pass residual;
- 128 random 7x7x3 neighbourhoods per image per level (147 values), each level's set normalised per
  colour channel to mean 0 / std 1 (each image set on its own);
- 4 repeats x 128 unit Gaussian directions: project, sort, mean |difference|, mean over repeats;
- reported x1e3 per level (`swd_128`, ..., `swd_16`) and their mean (`swd_avg`), as the paper's tables.
Stages below 16 px (4 and 8 px): there is one level, the image itself treated as the residual, so the
result has `swd_4` (or `swd_8`) and `swd_avg` equal to it. At 4 px a 7x7 neighbourhood does not fit:
3x3x3 neighbourhoods (27 values) are used there, so 4 px values are not comparable with the others.

Memory. Like the official code this keeps EVERY descriptor (no subsampling: the value is exactly the
paper's), but one pyramid level at a time: images stream through in batches once per level (an array or
a memmap is read again, never held whole), so RAM holds one level's descriptors per set, N x 128 x 147
float32 (1.2 GB per set for 16384 images), plus projections for a few directions at a time. With
`spill_dir` set, descriptor sets larger than `ram_bytes` live in an unlinked temp file there (np.memmap),
so resident memory stays bounded by `ram_bytes` + the projection chunk for any number of images.
Deviation: a constant colour channel (std 0) normalises to 0 instead of the official NaN.

Speed. Both implementations do the same GEMMs (N x 128 x 147 x 512 multiply-adds per level and set) and
the same sorts, so on a CPU the gain is bounded (bench/bench_swd.py). On the CPU the GEMMs and the sorts go
through numpy (OpenBLAS and its SIMD quicksort), measured 1.5-4x and ~7x faster here than torch's MKL
matmul on this AMD CPU and torch.sort; the pyramid is a pair of GEMMs per level (below) instead of
scipy's direct 5x5 convolution. On CUDA everything stays in torch.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from progan.fileio import scratch_array
from progan.metrics.swd_reference import draw_centres, draw_directions, level_sizes_px, nhood_px

_KERNEL_1D = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)   # [1,4,6,4,1]/16; outer product = official 5x5 / 256
DEFAULT_RAM_BYTES = 4 << 30          # descriptor sets above this go to spill_dir (when given)
_PROJ_BYTES = {"cpu": 512 << 20, "cuda": 1 << 30}   # per set: [directions chunk, M] float32 projections
# (on CUDA torch.sort also returns int64 indices: peak ~5x this per level)
_ROW_CHUNK = 65536                   # descriptors per matmul


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- Laplacian pyramid ----------------------------------------------------------------------------------
# The 5x5 kernel and the mirror padding are both separable, so each pyramid operation on an S x S image is
# M @ x @ M^T with a small banded matrix M that has the mirror edges folded in. On the CPU two GEMMs beat
# torch's single-channel conv2d and strided adds by 2-6x (measured here); on CUDA they are just as good.

def _mirror(j: int, s: int) -> int:
    """scipy.ndimage mode='mirror' (= torch 'reflect'): ... c b | a b c ... | x y | x ..."""
    if j < 0:
        j = -j
    if j > s - 1:
        j = 2 * (s - 1) - j
    return j


def down_matrix(s: int) -> np.ndarray:
    """[s/2, s]: official pyr_down along one axis (blur [1,4,6,4,1]/16 with mirror padding, keep even)."""
    m = np.zeros((s // 2, s))
    for i in range(s // 2):
        for t in range(-2, 3):
            m[i, _mirror(2 * i + t, s)] += _KERNEL_1D[t + 2]
    return m


def up_matrix(s: int) -> np.ndarray:
    """[2s, s]: official pyr_up along one axis (zeros between samples, blur 2 x [1,4,6,4,1]/16, mirror)."""
    m = np.zeros((2 * s, s))
    for o in range(2 * s):
        for t in range(-2, 3):
            q = _mirror(o + t, 2 * s)
            if q % 2 == 0:
                m[o, q // 2] += 2 * _KERNEL_1D[t + 2]
    return m


@lru_cache(maxsize=32)
def _level_matrices(res_px: int, level: int, last: bool, device: torch.device):
    """(P, D, U) for pyramid level `level` of an R px image: low-pass = P x P^T (P [S, R], the chained
    pyr_downs, None at level 0); band-pass = low - U (D low D^T) U^T (None, None for the last level)."""
    p = np.eye(res_px)
    for _ in range(level):
        p = down_matrix(p.shape[0]) @ p
    s = p.shape[0]
    as_t = lambda m: torch.from_numpy(m.astype(np.float32)).to(device)
    if last:
        return (None if level == 0 else as_t(p)), None, None
    return (None if level == 0 else as_t(p)), as_t(down_matrix(s)), as_t(up_matrix(s // 2))


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b for 2-D tensors (into `out` when given). On the CPU through numpy: its OpenBLAS runs these shapes
    at 175-230 GFLOP/s here against ~145 for torch's MKL build (measured: [512, 147] @ [147, 262144]; on an
    AMD CPU earlier ~90 against ~23)."""
    if a.is_cuda:
        return torch.mm(a, b, out=out)
    if out is None:
        return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))
    np.matmul(a.numpy(), b.numpy(), out=out.numpy())
    return out


def _apply2d_t(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(m @ x @ m^T)^T on each [S, S] plane of x [N, C, S, S] with m [T, S] -> contiguous [N, C, T, T].

    Two right-multiplications, (x m^T)^T m^T = m x^T m^T, so each is ONE big GEMM over all planes (a
    broadcast left-multiplication runs as many small ones) with one transposing copy between them. The
    result comes out transposed; callers either transpose back (a view) or apply it an even number of times.
    """
    n, c, s, _ = x.shape
    t = m.shape[0]
    y = _mm(x.reshape(-1, s), m.T).view(n, c, s, t).transpose(-1, -2).contiguous()   # [N, C, T, S]
    return _mm(y.view(-1, s), m.T).view(n, c, t, t)


def _apply2d(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """m @ x @ m^T on each [S, S] plane of x [N, C, S, S] -> [N, C, T, T]."""
    return _apply2d_t(x, m).transpose(-1, -2)


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    """[N, C, S, S] -> [N, C, S/2, S/2]: official pyr_down (scipy convolve mode='mirror', keep every 2nd)."""
    return _apply2d(x, torch.from_numpy(down_matrix(x.shape[-1]).astype(np.float32)).to(x.device))


def pyr_up(x: torch.Tensor) -> torch.Tensor:
    """[N, C, S, S] -> [N, C, 2S, 2S]: official pyr_up (insert zeros, kernel x4, mirror)."""
    return _apply2d(x, torch.from_numpy(up_matrix(x.shape[-1]).astype(np.float32)).to(x.device))


def pyramid_level(x: torch.Tensor, level: int, num_levels: int) -> torch.Tensor:
    """Level `level` of the Laplacian pyramid of [N, C, R, R] float images (the last level is low-pass):
    official generate_laplacian_pyramid, level i = G_i - pyr_up(pyr_down(G_i)), G_i = pyr_down^i(x).
    Computed in transposed form where that saves copies; the result may be a transposed view."""
    p, d, u = _level_matrices(int(x.shape[-1]), level, level == num_levels - 1, x.device)
    low, transposed = (x.contiguous(), False) if p is None else (_apply2d_t(x.contiguous(), p), True)
    if d is not None:
        low = low - _apply2d_t(_apply2d_t(low, d), u)         # two transposes: same orientation as low
    return low.transpose(-1, -2) if transposed else low


def get_descriptors(level: torch.Tensor, centres: torch.Tensor, nhood: int) -> torch.Tensor:
    """[N, C, S, S] level, centres [N, P, 2] (y, x) -> [N * P, C * nhood * nhood], layout (c, y, x)."""
    n, c, _, _ = level.shape
    h = nhood // 2
    patches = level.unfold(2, nhood, 1).unfold(3, nhood, 1)          # view [N, C, S-k+1, S-k+1, k, k]
    patches = patches.permute(0, 2, 3, 1, 4, 5)                       # [N, top-left y, x, C, k, k]
    img = torch.arange(n, device=level.device).view(n, 1).expand(n, centres.shape[1])
    return patches[img, centres[:, :, 0] - h, centres[:, :, 1] - h].reshape(-1, c * nhood * nhood)


# ---- one level's descriptors of one image set ------------------------------------------------------------

class Buffers:
    """Host float32 buffers reused by the levels and direction chunks of one `swd` call.

    The big arrays (each set's descriptors, 1.2 GB for 16,384 images; each set's projections, 512 MB) are the
    same size at every level and chunk. Allocating them anew costs a page fault per 4 KiB page on first
    touch: measured here 1.4 s to allocate and fill 512 MB fresh, against 0.1 s to refill one already
    touched, and the projection GEMM ran at 60 GFLOP/s into fresh memory against 225 into a reused buffer.
    Descriptor buffers above `ram_bytes` live in an unlinked temp file under `spill_dir` (`fileio.scratch_array`:
    unlinked at once, its blocks reserved so that a full disk is an error, not a SIGBUS).
    """

    def __init__(self, spill_dir=None, ram_bytes: int = DEFAULT_RAM_BYTES):
        self.spill_dir, self.ram_bytes = spill_dir, ram_bytes
        self._flat: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, spill: bool = False) -> torch.Tensor:
        """A contiguous [rows, cols] float32 view of buffer `name`, grown (never shrunk) as needed; its
        contents are whatever was last written there."""
        size = rows * cols
        flat = self._flat.get(name)
        if flat is None or flat.numel() < size:
            self._flat.pop(name, None)                      # free the old one before allocating the new one
            if spill and self.spill_dir is not None and 4 * size > self.ram_bytes:
                flat = torch.from_numpy(scratch_array(self.spill_dir, ".swd-", np.float32, (size,), "SWD descriptors"))
            else:
                flat = torch.empty(size)
            self._flat[name] = flat
        return flat[:size].view(rows, cols)


@torch.no_grad()
def level_descriptors(images, side: int, level: int, *, seed: int, per_image: int, batch: int,
                      device: torch.device, spill_dir=None, ram_bytes: int = DEFAULT_RAM_BYTES,
                      tick: Callable[[int], None] | None = None, buffers: Buffers | None = None):
    """Descriptors of pyramid level `level` for uint8 images [N, R, R, 3] (array-like, sliced in batches).

    Returns (desc [N * per_image, D] float32 on the CPU, mean [C], std [C]) with the per-channel
    statistics in float64 (std 0 -> 1). desc is the buffer `desc<side>` of `buffers` (overwritten by the next
    call for the same side; `swd` passes one Buffers to every level); without `buffers`, of a new
    Buffers(spill_dir, ram_bytes).
    """
    n, res = len(images), int(images.shape[1])
    sizes = level_sizes_px(res)
    size, k = sizes[level], nhood_px(sizes[level])
    dim = 3 * k * k
    buffers = buffers if buffers is not None else Buffers(spill_dir, ram_bytes)
    out = buffers.get(f"desc{side}", n * per_image, dim, spill=True)
    count, mean, m2 = 0, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        x = torch.from_numpy(np.ascontiguousarray(images[start:stop])).to(device).permute(0, 3, 1, 2)
        if device.type == "cpu":
            x = buffers.get("images", stop - start, 3 * res * res).view(-1, 3, res, res).copy_(x)
        else:
            x = x.to(torch.float32, memory_format=torch.contiguous_format)        # [B, 3, R, R]
        lvl = pyramid_level(x, level, len(sizes))
        centres = torch.from_numpy(draw_centres(seed, side, level, start, stop, size, per_image)).to(device)
        desc = get_descriptors(lvl, centres, k)                                  # [B * P, D]
        # per-channel mean / variance: centred float32 per batch, merged in float64 (Chan et al.), which
        # is as exact as float64 sums; plain float32 sums of squares move the SWD by ~2e-5 relative
        ch = desc.view(-1, 3, k * k)
        b_count = ch.shape[0] * k * k
        b_mean = ch.mean(dim=(0, 2))
        b_m2 = (ch - b_mean.view(1, 3, 1)).square().sum(dim=(0, 2))
        b_mean, b_m2 = b_mean.double().cpu(), b_m2.double().cpu()
        delta = b_mean - mean
        total = count + b_count
        mean = mean + delta * (b_count / total)
        m2 = m2 + b_m2 + delta.square() * (count * b_count / total)
        count = total
        out[start * per_image:stop * per_image] = desc.cpu()
        if tick is not None:
            tick(stop - start)
    std = (m2 / count).sqrt()
    return out, mean, torch.where(std > 0, std, torch.ones_like(std))


# ---- distance ------------------------------------------------------------------------------------------

def _sort_rows_(proj: torch.Tensor, threads: int) -> torch.Tensor:
    """Sort each row of [d, M] in place. On the CPU numpy's SIMD quicksort is ~7x faster than torch.sort
    (measured here: 11 vs 81 ns per element for 2M floats), so the CPU path sorts with numpy."""
    if proj.is_cuda:
        return torch.sort(proj, dim=1).values
    rows = proj.numpy()
    if threads > 1 and rows.shape[0] > 1:
        with ThreadPoolExecutor(threads) as pool:        # np.sort releases the GIL
            list(pool.map(lambda r: r.sort(), rows))
    else:
        rows.sort(axis=1)
    return proj


def normalise_(desc: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """In place: each colour channel to mean 0 / std 1 (official finalize_descriptors), in row chunks."""
    kk = desc.shape[1] // 3
    mean_row, std_row = mean.repeat_interleave(kk).float(), std.repeat_interleave(kk).float()
    for r0 in range(0, desc.shape[0], _ROW_CHUNK):
        desc[r0:r0 + _ROW_CHUNK].sub_(mean_row).div_(std_row)
    return desc


def _sorted_projections(desc: torch.Tensor, w: torch.Tensor, device: torch.device,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Projections of normalised descriptors [M, D] (CPU) on unit directions w [D, d], each row sorted: [d, M]
    (written into `out` [d, M] on the CPU when given)."""
    w = w.to(device)
    if device.type == "cpu":
        proj = _mm(w.T.contiguous(), desc.T, out)                      # one GEMM, rows contiguous for sorting
    else:
        proj = torch.empty(w.shape[1], desc.shape[0], device=device)
        for r0 in range(0, desc.shape[0], _ROW_CHUNK):
            rows = desc[r0:r0 + _ROW_CHUNK].to(device, non_blocking=True)
            proj[:, r0:r0 + rows.shape[0]] = torch.mm(w.T, rows.T)
    return _sort_rows_(proj, torch.get_num_threads())


@torch.no_grad()
def sliced_wasserstein(a, b, directions: np.ndarray, device: torch.device | None = None,
                       buffers: Buffers | None = None) -> float:
    """Mean over repeats and directions of mean |sort(a_n @ dir) - sort(b_n @ dir)| (not x1e3), where a_n, b_n
    are a, b normalised per colour channel.

    a, b: (desc [M, D], mean [C], std [C]) from `level_descriptors` (desc is normalised IN PLACE), or plain
    [M, D] arrays/tensors (copied; statistics computed here); directions [R, D, K] from `draw_directions`.
    The result equals the official mean over repeats of per-repeat means (every repeat has M x K terms).
    With `buffers` (CPU), the projections go into its buffers `proj0` and `proj1`.
    """
    device = torch.device(device) if device is not None else default_device()
    a, b = _with_stats(a), _with_stats(b)
    m, dim = a[0].shape
    if a[0].shape != b[0].shape:
        raise ValueError(f"descriptor sets must have the same [M, D] shape, got {tuple(a[0].shape)} "
                         f"and {tuple(b[0].shape)}")
    da, db = normalise_(*a), normalise_(*b)
    reps, _, per_rep = directions.shape
    all_dirs = torch.from_numpy(np.ascontiguousarray(directions.transpose(1, 0, 2).reshape(dim, -1)))
    chunk = max(1, min(all_dirs.shape[1], _PROJ_BYTES[device.type] // (4 * m)))
    total = 0.0
    for d0 in range(0, all_dirs.shape[1], chunk):
        w = all_dirs[:, d0:d0 + chunk]
        outs = ((buffers.get("proj0", w.shape[1], m), buffers.get("proj1", w.shape[1], m))
                if buffers is not None and device.type == "cpu" else (None, None))
        pa = _sorted_projections(da, w, device, outs[0])
        pb = _sorted_projections(db, w, device, outs[1])
        total += float(pa.sub_(pb).abs_().sum())          # float32 cascade sum of one chunk
        del pa, pb
    return total / (m * reps * per_rep)


def _with_stats(x):
    if isinstance(x, tuple):
        return x
    t = torch.tensor(np.asarray(x), dtype=torch.float32)                   # a copy: normalised in place
    ch = t.view(t.shape[0], 3, -1).double()
    mean = ch.mean(dim=(0, 2))
    std = ch.std(dim=(0, 2), correction=0)
    return t, mean, torch.where(std > 0, std, torch.ones_like(std))


def swd(a, b, *, descriptors_per_image: int = 128, directions: int = 128, repeats: int = 4, seed: int = 0,
        batch: int = 256, device: torch.device | str | None = None, spill_dir=None,
        ram_bytes: int = DEFAULT_RAM_BYTES, tick: Callable[[int], None] | None = None) -> dict[str, float]:
    """SWD x1e3 between two uint8 image sets [N, R, R, 3] (arrays or memmaps, same N and R).

    Returns {"swd_<R>": ..., ..., "swd_16": ..., "swd_avg": ...}. `a` uses centre stream side 0, `b`
    side 1, so `swd(reals, fakes)` equals `swd_reference.swd(reals, fakes)` with the same seed.
    `tick(n)` is called after every batch (n images) for progress bars: 2 x levels x N calls in all.
    """
    if len(a) != len(b) or tuple(a.shape[1:]) != tuple(b.shape[1:]):
        raise ValueError(f"need the same number and size of images, got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) < 1 or a.shape[1] != a.shape[2] or a.shape[3] != 3:
        raise ValueError(f"images must be [N, R, R, 3] with N >= 1, got {tuple(a.shape)}")
    device = torch.device(device) if device is not None else default_device()
    sizes = level_sizes_px(int(a.shape[1]))
    buffers = Buffers(spill_dir, ram_bytes)
    opts = dict(seed=seed, per_image=descriptors_per_image, batch=batch, device=device, tick=tick, buffers=buffers)
    result = {}
    for li, size in enumerate(sizes):
        da = level_descriptors(a, 0, li, **opts)
        db = level_descriptors(b, 1, li, **opts)
        dirs = draw_directions(seed, li, da[0].shape[1], repeats, directions)
        result[f"swd_{size}"] = sliced_wasserstein(da, db, dirs, device, buffers) * 1e3
        del da, db
    result["swd_avg"] = float(np.mean([result[f"swd_{s}"] for s in sizes]))
    if not all(math.isfinite(v) for v in result.values()):
        raise ValueError(f"SWD is not finite: {result}")
    return result
