"""Using a trained generator from Python (notebooks, scripts): `from progan import load_generator`.

    G = load_generator("results/64/checkpoint.pt", device="cpu")   # or an exported G.pt (`progan export`)
    images = G.sample(16, seed=0)        # uint8 [16, 64, 64, 3] (NHWC), the same for a seed on the same device
    x = G(z)                             # float [N, 3, 64, 64] (NCHW), nominally [-1, 1] (linear output, unclipped)
    frames = G.interpolate([1, 2, 3], steps=30)   # uint8 [61, 64, 64, 3]: a slerp walk through the seeds

Loading uses torch.load(weights_only=True) (a file that tries to run code is refused) and needs neither the
training code's state nor the dataset. Latents of a seed come from a CPU torch.Generator seeded with it, one
latent per index drawn in order, so image i of a seed does not depend on the batch size, on `n` or on the device
(official ProGAN draws them all at once from np.random.RandomState(seed): same idea, different numbers).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from progan import checkpoint
from progan.errors import ProganError
from progan.model import networks
from progan.pictures import to_uint8

MAX_SEED = 2**63 - 1


# --------------------------------------------------------------------------------------------- pure helpers

def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when a CUDA device is visible, else cpu; 'cpu', 'cuda', 'cuda:N' as given (checked)."""
    if isinstance(device, torch.device):
        dev = device
    else:
        name = str(device).strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ProganError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ProganError(f"device {str(dev)!r}: no CUDA device is visible here; use device 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ProganError(f"device {str(dev)!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise ProganError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return dev


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
        raise ProganError(f"seed must be an integer in [0, 2^63 - 1], got {seed!r}")
    return int(seed)


def seed_latents(seed: int, n: int, latent_dim: int) -> Tensor:
    """[n, latent_dim] float32 N(0, I) latents on the CPU: one torch.Generator seeded with `seed`, one draw of
    `latent_dim` numbers per index in order, so the first k rows are the same for every n >= k."""
    parts = list(latent_batches(seed, n, latent_dim, max(n, 1)))
    return parts[0] if parts else torch.empty(0, latent_dim)


def latent_batches(seed: int, n: int, latent_dim: int, batch: int) -> Iterator[Tensor]:
    """seed_latents(seed, n, latent_dim) in [<= batch, latent_dim] pieces, each drawn when it is asked for: memory
    for one batch whatever n is (`progan generate --n 100000000`)."""
    g = torch.Generator(device="cpu").manual_seed(check_seed(seed))
    if n < 0:
        raise ProganError(f"number of latents must be >= 0, got {n}")
    for start in range(0, n, batch):
        yield torch.stack([torch.randn(latent_dim, generator=g, dtype=torch.float32)
                           for _ in range(min(batch, n - start))])


def slerp(a: Tensor, b: Tensor, t: float | Sequence[float] | Tensor) -> Tensor:
    """Spherical interpolation between the DIRECTIONS of `a` and `b` ([D] vectors): unit vectors on the great
    circle from a/|a| (t=0, exact) to b/|b| (t=1, exact). `t` a number -> [D]; `t` a 1-D sequence -> [T, D].

    As the paper's latent-space video (progressive_growing_of_gans `util_scripts.py` generate_interpolation_video
    walks normalised latents): G pixel-normalises z first (§4.2), so only the direction of z matters and a
    straight line would cut through the sphere's inside. Math in float64; returns a's floating dtype.
    """
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.ndim != 1 or a.shape != b.shape:
        raise ProganError(f"slerp needs two vectors of the same length, got shapes {list(a.shape)} and {list(b.shape)}")
    dtype = a.dtype if a.is_floating_point() else torch.float32
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    na, nb = a64.norm(), b64.norm()
    if not (torch.isfinite(na) and torch.isfinite(nb)) or na == 0 or nb == 0:
        raise ProganError("slerp needs two finite non-zero vectors")
    a64, b64 = a64 / na, b64 / nb
    scalar_t = not isinstance(t, Tensor) and np.ndim(t) == 0
    tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)            # [T, 1]
    dot = torch.clamp((a64 * b64).sum(), -1.0, 1.0)
    if dot > 1.0 - 1e-12:                                                   # same direction: nothing to walk
        out = a64.expand(tt.shape[0], -1).clone()
    elif dot < -1.0 + 1e-12:
        raise ProganError("slerp between opposite directions is undefined (every great circle joins them)")
    else:
        omega = torch.acos(dot)
        so = torch.sin(omega)
        # coefficients first, so t=0 gives exactly 1*a + 0*b and t=1 exactly 0*a + 1*b
        ca, cb = torch.sin((1.0 - tt) * omega) / so, torch.sin(tt * omega) / so      # [T, 1]
        out = ca * a64 + cb * b64                                            # [T, D]
    out = out.to(dtype)
    return out[0] if scalar_t else out


def check_walk(seeds: Sequence[int], steps: int) -> list[int]:
    seeds = [check_seed(s) for s in seeds]
    if len(seeds) < 2:
        raise ProganError(f"an interpolation needs at least 2 seeds, got {len(seeds)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ProganError(f"steps must be an integer >= 1, got {steps!r}")
    return seeds


def walk_latents(seeds: Sequence[int], steps: int, latent_dim: int) -> Tensor:
    """[(len(seeds) - 1) * steps + 1, latent_dim] latents walking the sphere through each seed's latent.

    Segment i (seed i -> seed i+1) gives `steps` frames at t = 0, 1/steps, ..., (steps-1)/steps; the last seed
    closes the walk, so every seed is a frame (frame k*steps is seed k). The unit directions are scaled by
    sqrt(latent_dim), the radius where N(0, I) latents concentrate (irrelevant to G up to the pixel norm's eps).
    """
    seeds = check_walk(seeds, steps)
    keys = [seed_latents(s, 1, latent_dim)[0] for s in seeds]                   # image 0 of each seed
    t = torch.arange(steps, dtype=torch.float64) / steps
    parts = [slerp(k0, k1, t) for k0, k1 in zip(keys, keys[1:])]
    parts.append(slerp(keys[-2], keys[-1], 1.0)[None])
    return torch.cat(parts) * math.sqrt(latent_dim)


# ------------------------------------------------------------------------------------------------ the wrapper

class ProganGenerator:
    """G_ema of a trained ProGAN, ready to sample: `G(z)`, `G.sample(n, seed)`, `G.interpolate(seeds, steps)`.

    Attributes: `res_px`, `latent_dim`, `num_channels`, `device`, `alpha` (the fade-in weight the checkpoint was
    saved at, 1.0 once a stage is fully grown), `net` (the progan.model Generator, eval mode, no grads), `path`.
    """

    def __init__(self, net: networks.Generator, alpha: float = 1.0, path: Path | None = None):
        self.net = net.eval().requires_grad_(False)
        self.alpha = float(alpha)
        self.path = path

    @property
    def res_px(self) -> int:
        return self.net.res_px

    @property
    def latent_dim(self) -> int:
        return self.net.cfg.latent_dim

    @property
    def num_channels(self) -> int:
        return self.net.cfg.num_channels

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device) -> "ProganGenerator":
        self.net.to(resolve_device(device))
        return self

    def __repr__(self) -> str:
        return (f"ProganGenerator(res_px={self.res_px}, latent_dim={self.latent_dim}, alpha={self.alpha:g}, "
                f"device={str(self.device)!r}, path={str(self.path) if self.path else None!r})")

    def __call__(self, z) -> Tensor:
        """[N, latent_dim] latents (tensor or array, any device) -> [N, C, res_px, res_px] float32 on `device`."""
        z = torch.as_tensor(z, dtype=torch.float32).to(self.device)
        with torch.no_grad():
            return self.net(z, self.alpha)

    def latents(self, n: int, seed: int = 0) -> Tensor:
        """The [n, latent_dim] CPU latents `sample(n, seed)` uses (see `seed_latents`)."""
        return seed_latents(seed, n, self.latent_dim)

    def images(self, z: Tensor, batch: int = 64, progress=None) -> np.ndarray:
        """Latents [N, latent_dim] -> uint8 [N, H, W, C], `batch` at a time; `progress(k)` after each batch."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ProganError(f"batch must be an integer >= 1, got {batch!r}")
        out = []
        for chunk in torch.as_tensor(z).split(batch):
            out.append(to_uint8(self(chunk)))
            if progress is not None:
                progress(len(chunk))
        if not out:
            return np.zeros((0, self.res_px, self.res_px, self.num_channels), np.uint8)
        return np.concatenate(out)

    def sample(self, n: int, seed: int = 0, batch: int = 64) -> np.ndarray:
        """n images as uint8 [n, res_px, res_px, C] (NHWC); image i depends only on (seed, i) and the device."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ProganError(f"number of images must be an integer >= 1, got {n!r}")
        return self.images(self.latents(int(n), seed), batch)

    def interpolate(self, seeds: Sequence[int], steps: int, batch: int = 64) -> np.ndarray:
        """uint8 [(len(seeds) - 1) * steps + 1, H, W, C] frames of a slerp walk through the seeds (walk_latents)."""
        return self.images(walk_latents(seeds, steps, self.latent_dim), batch)


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> ProganGenerator:
    """G_ema of a training checkpoint (results/<R>/checkpoint.pt) or of an exported generator (`progan export`).

    `device`: 'cpu' (default), 'cuda', 'cuda:N' or 'auto'. Errors (missing, truncated, foreign, wrong version,
    a pickle that tries to run code) are one-line ProganErrors naming the file.
    """
    dev = resolve_device(device)
    path = Path(path)
    saved = checkpoint.load_generator(path, "cpu")    # checks format, version, keys and shapes; weights_only
    return ProganGenerator(saved.G.to(dev), saved.alpha, path)
