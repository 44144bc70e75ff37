"""The metrics `evaluate.metrics` may list: name -> a function of one evaluation's inputs returning dict[str, float].

`progan evaluate` (progan/evaluate.py) fills an EvalContext once (reals, the generated images it kept, the
Inception features it streamed) and calls the selected functions; what they return goes to eval.json and
MLflow. The schema's `evaluate.metrics` enum is this registry's names (a test keeps them equal).
  swd      SWD x1e3 per Laplacian level and average, reals vs fakes, and the real-half-vs-half floor
           (swd_<px>, swd_avg, swd_real_vs_real_<px>, swd_real_vs_real_avg)
  msssim   mean MS-SSIM of generated pairs and of real pairs (msssim_fake, msssim_real)
  fid      Frechet Inception distance (fid<N>, N = evaluate.fid.num_images: fid50k)
  kid      kernel Inception distance, mean and std over subsets (kid<N>, kid<N>_std)
  is       Inception Score of the generated images, mean and std over splits (is<N>, is<N>_std)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from progan.log import log, progress
from progan.metrics import Rows
from progan.metrics import real_stats as stats_mod


@dataclass
class EvalContext:
    """What one `progan evaluate --res R` has at hand when the metrics run."""
    res: int
    ev: object                      # params.evaluate
    device: object
    reals: np.ndarray               # uint8 [M, R, R, 3] memmap of the pyramid level
    perm: np.ndarray                # seeded permutation of the reals (SWD, MS-SSIM)
    n: int                          # SWD: reals and fakes compared
    fakes: np.ndarray | None        # uint8 [n, R, R, 3] generated images kept for SWD
    msssim_fake: float | None       # mean MS-SSIM of the generated pairs (scored while generating)
    spill_dir: str
    inception: stats_mod.InceptionSettings | None = None
    fake_features: object = None    # metrics.fid.FeatureSet of the generated images
    real_stats: stats_mod.RealStats | None = None
    info: dict = field(default_factory=dict)    # counts a metric reports beside its numbers (eval.json)


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[EvalContext], dict[str, float]]
    inception: bool                 # needs the Inception network (and stage >= evaluate.fid.min_res_px)


METRICS: dict[str, Metric] = {}


def metric(name: str, inception: bool = False):
    def register(fn):
        METRICS[name] = Metric(name, fn, inception)
        return fn
    return register


def _fmt(values: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in values.items())


@metric("swd")
def swd(ctx: EvalContext) -> dict[str, float]:
    from progan.metrics import swd as swd_mod

    ev, n, half = ctx.ev, ctx.n, ctx.n // 2
    opts = dict(descriptors_per_image=int(ev.swd_descriptors_per_image), directions=int(ev.swd_directions),
                repeats=int(ev.swd_repeats), seed=int(ev.seed), batch=int(ev.batch), device=ctx.device,
                spill_dir=ctx.spill_dir)
    levels = len(swd_mod.level_sizes_px(ctx.res))
    with progress(total=2 * levels * (n + half), desc=f"evaluate {ctx.res}px: SWD", unit="img") as bar:
        fake = swd_mod.swd(Rows(ctx.reals, ctx.perm[:n]), ctx.fakes, tick=bar.update, **opts)
        log.info("evaluate %dpx: SWD x1e3 reals vs fakes %s", ctx.res, _fmt(fake))
        floor = swd_mod.swd(Rows(ctx.reals, ctx.perm[:half]), Rows(ctx.reals, ctx.perm[half:2 * half]),
                            tick=bar.update, **opts)
    log.info("evaluate %dpx: SWD x1e3 real half vs real half (noise floor) %s", ctx.res, _fmt(floor))
    ctx.info["swd_real_vs_real_images"] = half
    return {**fake, **{f"swd_real_vs_real_{k[len('swd_'):]}": v for k, v in floor.items()}}


def msssim_of_pairs(images, index: np.ndarray, batch: int, device) -> float | None:
    """Mean MS-SSIM over pairs (images[index[2k]], images[index[2k+1]])."""
    import torch

    from progan.metrics import msssim as msssim_mod

    scores = []
    batch = max(2, batch - batch % 2)
    for start in range(0, len(index) - 1, batch):
        rows = images[index[start:start + batch]]                                # [B, R, R, 3]
        m = len(rows) - len(rows) % 2
        scores.append(msssim_mod.msssim_per_pair(rows[0:m:2], rows[1:m:2], device))
    return float(torch.cat(scores).mean()) if scores else None


@metric("msssim")
def msssim(ctx: EvalContext) -> dict[str, float]:
    num_pairs = int(ctx.ev.msssim_pairs)
    real_pairs = min(num_pairs, len(ctx.reals) // 2)
    real = msssim_of_pairs(ctx.reals, ctx.perm[:2 * real_pairs], int(ctx.ev.batch), ctx.device) if real_pairs else None
    log.info("evaluate %dpx: MS-SSIM fakes %s (%d pairs), reals %s (%d pairs)", ctx.res,
             "n/a" if ctx.msssim_fake is None else f"{ctx.msssim_fake:.4f}", num_pairs,
             "n/a" if real is None else f"{real:.4f}", real_pairs)
    ctx.info.update(msssim_pairs_fake=num_pairs, msssim_pairs_real=real_pairs)
    return {k: v for k, v in (("msssim_fake", ctx.msssim_fake), ("msssim_real", real)) if v is not None}


def _inception_scores(ctx: EvalContext, name: str) -> dict[str, float]:
    return stats_mod.scores(ctx.fake_features, ctx.real_stats, ctx.inception, [name])


@metric("fid", inception=True)
def fid(ctx: EvalContext) -> dict[str, float]:
    return _inception_scores(ctx, "fid")


@metric("kid", inception=True)
def kid(ctx: EvalContext) -> dict[str, float]:
    from progan.metrics.fid import kid_subset_size

    ctx.info["kid_subset_size"] = kid_subset_size(ctx.inception.kid_subset_size, len(ctx.real_stats.features),
                                                  ctx.fake_features.n)
    return _inception_scores(ctx, "kid")


@metric("is", inception=True)
def inception_score(ctx: EvalContext) -> dict[str, float]:
    return _inception_scores(ctx, "is")


def metric_keys(name: str, params) -> list[str]:
    """The keys metric `name` writes for the Inception metrics (fid50k, kid50k, kid50k_std, ...)."""
    from progan.metrics.fid import metric_key

    key = metric_key(name, int(params.evaluate.fid.num_images))
    return {"fid": [key], "kid": [key, f"{key}_std"], "is": [key, f"{key}_std"]}.get(name, [])
