"""`progan evaluate --res R`: SWD and MS-SSIM of one finished stage -> results/<R>/eval.json.

Paper §5 / official `metrics/` (tkarras/progressive_growing_of_gans):
- fakes: `evaluate.num_images` images from G_ema of results/<R>/checkpoint.pt, latents drawn once from
  `evaluate.seed` (image i has the same latent whatever the batch size), converted to uint8 the official way
  (x * 127.5 + 127.5, rounded, clipped);
- reals: as many images of data/pyramid/<R>.npy, a seeded random subset (all of them if fewer exist; the
  count used is recorded and the same number of fakes is generated);
- `swd`: SWD x1e3 per pyramid level and the average, reals vs fakes (metrics/swd.py);
- `swd_real_vs_real`: the same between two disjoint halves of those reals: the noise floor (its sets are
  half as big, so it sits a little above what a perfect generator would get against the full set);
- `msssim_fake`: mean MS-SSIM over `evaluate.msssim_pairs` consecutive pairs (2k, 2k+1) of generated images
  (more images are generated for it if needed, official ms_ssim.API); `msssim_real`: the same over random
  pairs of reals (as many pairs as the reals allow), the reference value.
At 4 and 8 px the SWD has one level (see metrics/swd.py) and MS-SSIM fewer scales (metrics/msssim.py).
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch

from progan import paths
from progan.errors import ProganError, out_of_memory_error
from progan.fileio import scratch_array, torch_load, write_json
from progan.log import log, progress
from progan.metrics import msssim as msssim_mod
from progan.metrics import swd as swd_mod

_RAM_IMAGE_BYTES = 2 << 30      # generated images above this go to an unlinked temp file beside eval.json


class _Rows:
    """Rows `index` of an [N, ...] array or memmap, read only when sliced (for SWD's batched passes)."""

    def __init__(self, array, index: np.ndarray):
        self.array, self.index = array, np.asarray(index)
        self.shape = (len(self.index), *array.shape[1:])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item):
        return self.array[self.index[item]]


def _open_reals(res: int) -> np.ndarray:
    path = paths.pyramid_level(res)
    if not Path(path).is_file():
        raise ProganError(f"{path}: no real images at {res} px; run `progan pyramid` first")
    try:
        reals = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise ProganError(f"{path}: not a readable .npy array ({e}); re-run `progan pyramid`") from None
    if reals.dtype != np.uint8 or reals.ndim != 4 or reals.shape[1:] != (res, res, 3):
        raise ProganError(f"{path}: expected uint8 [N, {res}, {res}, 3], got {reals.dtype} {list(reals.shape)}; "
                          f"re-run `progan pyramid`")
    if len(reals) < 2:
        raise ProganError(f"{path}: has {len(reals)} image(s); evaluation needs at least 2")
    return reals


def _image_buffer(n: int, res: int, spill_dir: str) -> np.ndarray:
    if n * res * res * 3 <= _RAM_IMAGE_BYTES:
        return np.empty((n, res, res, 3), np.uint8)
    return scratch_array(spill_dir, ".fakes-", np.uint8, (n, res, res, 3), f"{n} generated images")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, 3, R, R] generator output in [-1, 1] -> uint8 [N, R, R, 3] (official out_mul/out_add 127.5)."""
    return (x.float() * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def latents(seed: int, count: int, latent_dim: int) -> torch.Tensor:
    """[count, latent_dim] standard normal latents; row i depends only on (seed, i, latent_dim)."""
    return torch.randn(count, latent_dim, generator=torch.Generator().manual_seed(int(seed)))


@torch.no_grad()
def generate(G, z: torch.Tensor, num_keep: int, num_pairs: int, batch: int, device, res: int, spill_dir: str):
    """Run G on every latent; keep the first `num_keep` images and score pairs (2k, 2k+1), k < num_pairs.

    Returns (uint8 images [num_keep, R, R, 3], mean MS-SSIM of the pairs or None).
    """
    batch = max(2, batch - batch % 2)          # even batches: a pair never straddles two batches
    keep = _image_buffer(num_keep, res, spill_dir)
    pair_scores = []
    with progress(total=len(z), desc=f"evaluate {res}px: generate", unit="img") as bar:   # closed on errors too
        for start in range(0, len(z), batch):
            stop = min(start + batch, len(z))
            images = to_uint8(G(z[start:stop].to(device)))                         # [B, R, R, 3]
            if start < num_keep:
                keep[start:min(stop, num_keep)] = images[:num_keep - start]
            pairs_end = min(stop, 2 * num_pairs) - start
            if pairs_end >= 2:
                pairs = images[:pairs_end - pairs_end % 2]
                pair_scores.append(msssim_mod.msssim_per_pair(pairs[0::2], pairs[1::2], device))
            bar.update(stop - start)
    score = float(torch.cat(pair_scores).mean()) if pair_scores else None
    return keep, score


def msssim_of_pairs(images, index: np.ndarray, batch: int, device) -> float | None:
    """Mean MS-SSIM over pairs (images[index[2k]], images[index[2k+1]])."""
    scores = []
    batch = max(2, batch - batch % 2)
    for start in range(0, len(index) - 1, batch):
        rows = images[index[start:start + batch]]                                # [B, R, R, 3]
        m = len(rows) - len(rows) % 2
        scores.append(msssim_mod.msssim_per_pair(rows[0:m:2], rows[1:m:2], device))
    return float(torch.cat(scores).mean()) if scores else None


def _trained_kimg(path: str) -> float:
    """total_kimg of the checkpoint (0 for an exported generator without it); mmap: no full read."""
    try:
        ckpt = torch_load(path, mmap=True)
        return float(ckpt.get("total_kimg", 0.0))
    except Exception:  # noqa: BLE001 - load_generator already validated the file; the step is cosmetic
        return 0.0


def _tracking():
    try:
        from progan import tracking
        return tracking
    except ImportError:     # tracking.py missing: evaluate still writes eval.json
        return None


def load_inputs(params, res: int, device) -> tuple:
    """(reals memmap, G_ema) of stage `res`, checked; every problem is a one-line ProganError."""
    from progan.model.networks import load_generator

    reals = _open_reals(res)
    ckpt = paths.checkpoint(res)
    G = load_generator(ckpt, device)
    if G.res_px != res:
        raise ProganError(f"{ckpt}: holds a {G.res_px} px generator, expected {res} px; re-run `progan train "
                          f"--res {res}`")
    return reals, G


def evaluate(params, res: int, inputs: tuple | None = None) -> dict:
    """Compute every metric of stage `res`; returns the eval.json dict (not written)."""
    t0 = time.time()
    ev = params.evaluate
    device = swd_mod.default_device()
    reals, G = inputs if inputs is not None else load_inputs(params, res, device)
    ckpt = paths.checkpoint(res)
    n = min(int(ev.num_images), len(reals))
    if n < int(ev.num_images):
        log.warning("evaluate %dpx: only %d real images in %s (evaluate.num_images is %d); using %d reals "
                    "and %d fakes", res, len(reals), paths.pyramid_level(res), ev.num_images, n, n)
    num_pairs = int(ev.msssim_pairs)
    batch, seed = int(ev.batch), int(ev.seed)
    log.info("evaluate %dpx: %d fakes vs %d reals on %s, SWD %d x %d directions, MS-SSIM over %d pairs",
             res, n, n, device, ev.swd_repeats, ev.swd_directions, num_pairs)

    z = latents(seed, max(n, 2 * num_pairs), G.cfg.latent_dim)
    fakes, msssim_fake = generate(G, z, n, num_pairs, batch, device, res, paths.stage_dir(res))
    del G

    perm = np.random.default_rng(seed).permutation(len(reals))                  # random reals, fixed by seed
    real_rows = _Rows(reals, perm[:n])
    half = n // 2
    swd_opts = dict(descriptors_per_image=int(ev.swd_descriptors_per_image), directions=int(ev.swd_directions),
                    repeats=int(ev.swd_repeats), seed=seed, batch=batch, device=device,
                    spill_dir=paths.stage_dir(res))
    levels = len(swd_mod.level_sizes_px(res))
    with progress(total=2 * levels * (n + half), desc=f"evaluate {res}px: SWD", unit="img") as bar:
        swd = swd_mod.swd(real_rows, fakes, tick=bar.update, **swd_opts)
        log.info("evaluate %dpx: SWD x1e3 reals vs fakes %s", res, _fmt(swd))
        swd_rr = swd_mod.swd(_Rows(reals, perm[:half]), _Rows(reals, perm[half:2 * half]), tick=bar.update,
                             **swd_opts)
    log.info("evaluate %dpx: SWD x1e3 real half vs real half (noise floor) %s", res, _fmt(swd_rr))
    del fakes

    real_pairs = min(num_pairs, len(reals) // 2)
    msssim_real = msssim_of_pairs(reals, perm[:2 * real_pairs], batch, device) if real_pairs else None
    log.info("evaluate %dpx: MS-SSIM fakes %s (%d pairs), reals %s (%d pairs)", res, _fmt(msssim_fake),
             num_pairs, _fmt(msssim_real), real_pairs)
    return {
        "res_px": res,
        "num_images": n,
        "num_images_requested": int(ev.num_images),
        "num_reals_available": int(len(reals)),
        "swd": swd,
        "swd_real_vs_real": swd_rr,
        "swd_real_vs_real_images": half,
        "msssim_fake": msssim_fake,
        "msssim_real": msssim_real,
        "msssim_pairs_fake": num_pairs,
        "msssim_pairs_real": real_pairs,
        "total_kimg": _trained_kimg(ckpt),
        "device": str(device),
        "seconds": round(time.time() - t0, 3),
    }


def _mlflow_metrics(result: dict) -> dict[str, float]:
    """swd_<px>, swd_avg, swd_real_vs_real_<px>, swd_real_vs_real_avg, msssim_fake, msssim_real, eval_seconds."""
    metrics = dict(result["swd"])
    metrics.update({f"swd_real_vs_real_{k[len('swd_'):]}": v for k, v in result["swd_real_vs_real"].items()})
    metrics.update({k: result[k] for k in ("msssim_fake", "msssim_real") if result[k] is not None})
    metrics["eval_seconds"] = result["seconds"]
    return metrics


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, dict):
        return " ".join(f"{k}={v:.3f}" for k, v in value.items())
    return f"{value:.4f}"


def run(params, res: int, lease=None) -> dict:
    """`progan evaluate --res R`. `lease` (gpus.Lease from the CLI) has already set CUDA_VISIBLE_DEVICES."""
    res = int(res)
    if res not in params.resolutions:
        raise ProganError(f"--res {res}: not a training resolution; crop.size {params.crop.size} gives "
                          f"{', '.join(map(str, params.resolutions))}")
    inputs = load_inputs(params, res, swd_mod.default_device())     # fail fast, before any MLflow run
    tracking = _tracking()
    run_ctx = tracking.stage_run(params, res=res, job="evaluate") if tracking else contextlib.nullcontext()
    with run_ctx as tr:
        try:
            result = evaluate(params, res, inputs)
        except torch.cuda.OutOfMemoryError as e:
            raise out_of_memory_error(e, f"evaluate {res} px", "evaluate.batch", params.evaluate.batch,
                                      f"progan evaluate --res {res}",
                                      f"{paths.checkpoint(res)} and any previous {paths.eval_json(res)} are untouched") from e
        write_json(paths.eval_json(res), result)       # inside the run: attached as an artifact on exit
        if tr is not None:
            tr.log_metrics(_mlflow_metrics(result), step_kimg=result["total_kimg"])
    log.info("evaluate %dpx: wrote %s in %.1f s", res, paths.eval_json(res), result["seconds"])
    return result
