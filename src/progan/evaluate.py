"""`progan evaluate --res R`: the metrics `evaluate.metrics` lists, of one finished stage -> results/<R>/eval.json
(and its headline numbers, progan.headline, -> results/<R>/eval_metrics.json: the DVC metrics file).

Paper §5 / official `metrics/` (tkarras/progressive_growing_of_gans):
- fakes: G_ema of results/<R>/checkpoint.pt on latents drawn once from `evaluate.seed` (image i has the same
  latent whatever the batch size), converted to uint8 the official way (x * 127.5 + 127.5, rounded, clipped);
  one pass makes every image any metric needs (SWD's, MS-SSIM's pairs, the Inception metrics' first
  `evaluate.fid.num_images`), the Inception features are taken while generating;
- reals: `evaluate.num_images` images of data/pyramid/<R>.npy for SWD, a seeded random subset (all of them if
  fewer exist; the count used is recorded and the same number of fakes is compared); when the run trained with
  `train.mirror_augment`, each real is mirrored with probability 1/2 (seeded by `evaluate.seed`) for SWD and
  MS-SSIM, as the official util_scripts.py evaluate_metrics L199-200 does (`misc.apply_mirror_augment`:
  mask = rand(N) < 0.5); eval.json says so (`reals_mirrored`, `reals_mirrored_count`, `reals_mirrored_metrics`).
  The Inception metrics' reals (the fid-stats file) are not mirrored (the official code mirrors them too);
- `swd`: SWD x1e3 per pyramid level and the average, reals vs fakes (metrics/swd.py);
- `swd_real_vs_real`: the same between two disjoint halves of those reals: the noise floor (its sets are
  half as big, so it sits a little above what a perfect generator would get against the full set);
- `msssim_fake`: mean MS-SSIM over `evaluate.msssim_pairs` consecutive pairs (2k, 2k+1) of generated images
  (more images are generated for it if needed, official ms_ssim.API); `msssim_real`: the same over random
  pairs of reals (as many pairs as the reals allow), the reference value;
- `fid50k`, `kid50k` (+ `_std`), `is50k` (+ `_std`): TF-Inception FID / KID / IS of `evaluate.fid.num_images`
  fakes (the key names the count) against the reals' statistics (metrics/real_stats.py): the file
  data/fid-stats/<R>.npz when it matches these settings and this level, else computed here from the level.
  Only at R >= evaluate.fid.min_res_px; without the Inception weights (offline, no file) one line is logged,
  the other metrics are still written and these keys are absent; `notes` in eval.json says why.
eval.json records the level it was computed against (`reals_sha256`, from data/pyramid/pyramid.json, a dep).
`progan evaluate --checkpoint FILE` (not a DAG stage): the same metrics of any checkpoint our tools read (an imported
official network, `progan import`; an export; a stage's) against the pyramid level of its resolution, written to
`--out` (default FILE with .eval.json), with no MLflow run; the fakes are G_ema at the alpha the file holds.
At 4 and 8 px the SWD has one level (see metrics/swd.py) and MS-SSIM fewer scales (metrics/msssim.py).
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from progan import headline, paths
from progan.errors import ProganError, out_of_memory_error
from progan.fileio import scratch_array, sha256_file, write_json
from progan.log import log, progress
from progan.metrics import fid as fid_mod
from progan.metrics import inception
from progan.metrics import msssim as msssim_mod
from progan.metrics import real_stats as stats_mod
from progan.metrics import swd as swd_mod
from progan.metrics.registry import METRICS, EvalContext
from progan.pictures import to_uint8

_RAM_IMAGE_BYTES = 2 << 30      # generated images above this go to an unlinked temp file beside eval.json
MIRRORED_METRICS = ("swd", "msssim")   # the metrics whose reals are mirrored under train.mirror_augment


def mirror_mask(seed: int, count: int) -> np.ndarray:
    """Which of the level's `count` reals are mirrored: independent coin flips, p = 1/2 (official
    misc.apply_mirror_augment `np.random.rand(N) < 0.5`), from a stream of their own seeded by `seed`."""
    return np.random.default_rng([int(seed), 1]).random(count) < 0.5


class _Mirrored:
    """The reals [N, H, W, C] with the rows whose `flip` is True mirrored left-right when read (as official
    apply_mirror_augment's minibatch[mask, :, :, ::-1] on NCHW); indexable like the memmap (metrics.Rows)."""

    def __init__(self, array, flip: np.ndarray):
        self.array, self.flip, self.shape, self.dtype = array, flip, array.shape, array.dtype

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index):
        index = np.arange(len(self.array))[index]
        rows = np.array(self.array[index])
        f = self.flip[index]
        rows[f] = rows[f, :, ::-1]
        return rows


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


def latents(seed: int, count: int, latent_dim: int) -> torch.Tensor:
    """[count, latent_dim] standard normal latents; row i depends only on (seed, i, latent_dim)."""
    return torch.randn(count, latent_dim, generator=torch.Generator().manual_seed(int(seed)))


@torch.no_grad()
def generate(G, z: torch.Tensor, num_keep: int, num_pairs: int, batch: int, device, res: int, spill_dir: str,
             sink=None, sink_count: int = 0, alpha: float = 1.0):
    """Run G (at fade-in weight `alpha`) on every latent; keep the first `num_keep` images, score pairs (2k, 2k+1),
    k < num_pairs, and hand the first `sink_count` images, batch by batch, to `sink(uint8 [B, R, R, 3])` (the
    Inception features).

    Returns (uint8 images [num_keep, R, R, 3], mean MS-SSIM of the pairs or None).
    """
    batch = max(2, batch - batch % 2)          # even batches: a pair never straddles two batches
    keep = _image_buffer(num_keep, res, spill_dir)
    pair_scores = []
    desc = f"evaluate {res}px: generate" + (" + Inception" if sink is not None and sink_count else "")
    with progress(total=len(z), desc=desc, unit="img") as bar:   # closed on errors too
        for start in range(0, len(z), batch):
            stop = min(start + batch, len(z))
            images = to_uint8(G(z[start:stop].to(device), alpha))                  # [B, R, R, 3]
            if start < num_keep:
                keep[start:min(stop, num_keep)] = images[:num_keep - start]
            pairs_end = min(stop, 2 * num_pairs) - start
            if pairs_end >= 2:
                pairs = images[:pairs_end - pairs_end % 2]
                pair_scores.append(msssim_mod.msssim_per_pair(pairs[0::2], pairs[1::2], device))
            if sink is not None and start < sink_count:
                sink(images[:sink_count - start])
            bar.update(stop - start)
    score = float(torch.cat(pair_scores).mean()) if pair_scores else None
    return keep, score


def _tracking():
    try:
        from progan import tracking
        return tracking
    except ImportError:     # tracking.py missing: evaluate still writes eval.json
        return None


def load_inputs(params, res: int, device) -> tuple:
    """(reals memmap, checkpoint.GeneratorFile) of stage `res`, checked; every problem is a one-line ProganError."""
    from progan import checkpoint

    reals = _open_reals(res)
    ckpt = paths.checkpoint(res)
    trained = checkpoint.load_generator(ckpt, device)
    if trained.G.res_px != res:
        raise ProganError(f"{ckpt}: holds a {trained.G.res_px} px generator, expected {res} px; re-run `progan train "
                          f"--res {res}`")
    return reals, trained


def _level_sha256(res: int) -> str:
    """sha256 of data/pyramid/<res>.npy: from pyramid.json (the pyramid stage hashes what it writes), else hashed."""
    try:
        info = json.loads(Path(paths.PYRAMID_INFO).read_text())
        digest = info["levels"][str(res)]["sha256"]
        if isinstance(digest, str) and len(digest) == 64:
            return digest
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return sha256_file(paths.pyramid_level(res))


def _real_stats(res: int, reals, settings, net, device, level_sha256: str) -> tuple[stats_mod.RealStats, str | None]:
    """(the reals' statistics, the file they came from or None): data/fid-stats/<res>.npz when it belongs to these
    settings and this level, else computed here (the file is the fid-stats stage's to write)."""
    path = paths.fid_stats(res)
    if Path(path).is_file():
        try:
            stats = stats_mod.load_real_stats(path, settings, res, len(reals), level_sha256)
            if stats is not None:
                log.info("evaluate %dpx: reals' Inception statistics from %s (%d reals)", res, path, len(stats.features))
                return stats, path
            log.warning("evaluate %dpx: %s is a placeholder (made without the weights); computing the reals' "
                        "statistics here, for this evaluation only; %s", res, path, stats_mod.after_weights())
        except stats_mod.StaleStats as e:
            log.warning("evaluate %dpx: %s; computing the reals' statistics here instead", res, e)
    stats = stats_mod.real_stats_from_level(reals, settings, net, device, res, paths.pyramid_level(res))
    return stats, None


def _inception_inputs(params, res: int, reals, names: list[str], device, level_sha256: str):
    """(settings, net, real stats, stats file or None) for the Inception metrics `names`, or a note
    (str) saying why they are not computed at this stage."""
    settings = stats_mod.InceptionSettings.from_params(params)
    what = ", ".join(names)
    if res < settings.min_res_px:
        return f"{what}: not computed at {res} px (below evaluate.fid.min_res_px {settings.min_res_px})"
    try:
        net, _ = inception.load_network(device, settings.weights, settings.cache_dir)
    except inception.WeightsUnavailable as e:
        log.warning("evaluate %dpx: %s; %s not computed, the other metrics still are", res, e, what)
        return f"{what}: not computed: {e}"
    stats, stats_file = _real_stats(res, reals, settings, net, device, level_sha256)
    return settings, net, stats, stats_file


def _inception_sink(net, into: fid_mod.FeatureSet, settings, device, res: int):
    def sink(images: np.ndarray) -> None:
        try:
            fid_mod.extract(net, images, into, settings.batch, device)
        except torch.cuda.OutOfMemoryError as e:
            raise out_of_memory_error(e, f"evaluate {res} px (Inception)", "evaluate.fid.batch", settings.batch,
                                      f"progan evaluate --res {res}",
                                      f"{paths.checkpoint(res)} and any previous {paths.eval_json(res)} are untouched") from e
    return sink


def evaluate(params, res: int, inputs: tuple | None = None, spill_dir: str | None = None) -> dict:
    """Compute every selected metric of stage `res`; returns the eval.json dict (not written). `spill_dir`: where
    generated images too big for memory go (default results/<res>/)."""
    t0 = time.time()
    ev = params.evaluate
    device = swd_mod.default_device()
    reals, trained = inputs if inputs is not None else load_inputs(params, res, device)
    G, total_kimg = trained.G, trained.total_kimg
    spill_dir = spill_dir or paths.stage_dir(res)
    selected = list(ev.metrics)
    n = min(int(ev.num_images), len(reals))
    if n < int(ev.num_images) and "swd" in selected:
        log.warning("evaluate %dpx: only %d real images in %s (evaluate.num_images is %d); using %d reals "
                    "and %d fakes", res, len(reals), paths.pyramid_level(res), ev.num_images, n, n)
    num_pairs = int(ev.msssim_pairs) if "msssim" in selected else 0
    batch, seed = int(ev.batch), int(ev.seed)
    notes: list[str] = []
    wanted = [m for m in selected if METRICS[m].inception]
    reals_sha256 = _level_sha256(res)            # recorded; checks the reals' statistics file against the level
    got = _inception_inputs(params, res, reals, wanted, device, reals_sha256) if wanted else None
    if isinstance(got, str):
        notes.append(got)
        wanted, got = [], None
    settings, net, real_stats, stats_file = got or (None,) * 4
    n_inception = settings.num_images if wanted else 0
    log.info("evaluate %dpx on %s: %s; %d fakes vs %d reals for SWD (%d x %d directions), MS-SSIM over %d pairs%s",
             res, device, ", ".join(m for m in selected if not METRICS[m].inception or m in wanted), n, n,
             ev.swd_repeats, ev.swd_directions, num_pairs,
             f", {n_inception} fakes vs {len(real_stats.features)} reals for {', '.join(wanted)}" if wanted else "")

    fake_features = stats_mod.fake_feature_set(settings, wanted, device) if wanted else None
    sink = _inception_sink(net, fake_features, settings, device, res) if wanted else None
    n_swd = n if "swd" in selected else 0
    z = latents(seed, max(n_swd, 2 * num_pairs, n_inception, 1), G.cfg.latent_dim)
    fakes, msssim_fake = generate(G, z, n_swd, num_pairs, batch, device, res, spill_dir, sink=sink,
                                  sink_count=n_inception, alpha=trained.alpha)
    del G, trained, net

    mirrored = bool(params.train.mirror_augment) and any(m in selected for m in MIRRORED_METRICS)
    flip = mirror_mask(seed, len(reals)) if mirrored else None
    perm = np.random.default_rng(seed).permutation(len(reals))                       # random reals, fixed by seed
    ctx = EvalContext(res=res, ev=ev, device=device, reals=_Mirrored(reals, flip) if mirrored else reals, perm=perm,
                      n=n, fakes=fakes, msssim_fake=msssim_fake, spill_dir=spill_dir, inception=settings,
                      fake_features=fake_features, real_stats=real_stats)
    values = {name: METRICS[name].fn(ctx) for name in selected if not METRICS[name].inception or name in wanted}
    ctx.fakes = fakes = None

    result = {"res_px": res, "num_images": n, "num_images_requested": int(ev.num_images),
              "num_reals_available": int(len(reals)), "reals_sha256": reals_sha256, "metrics": selected,
              "notes": notes,
              "reals_mirrored": mirrored,           # train.mirror_augment: a seeded random half mirrored (official)
              "reals_mirrored_count": int(flip[perm[:n]].sum()) if mirrored else 0,
              "reals_mirrored_metrics": [m for m in MIRRORED_METRICS if m in selected] if mirrored else []}
    if "swd" in values:
        result["swd"] = {k: v for k, v in values["swd"].items() if not k.startswith("swd_real_vs_real_")}
        result["swd_real_vs_real"] = {f"swd_{k[len('swd_real_vs_real_'):]}": v for k, v in values["swd"].items()
                                      if k.startswith("swd_real_vs_real_")}
    if "msssim" in values:
        result.update(msssim_fake=values["msssim"].get("msssim_fake"), msssim_real=values["msssim"].get("msssim_real"))
    result.update(ctx.info)
    for name in wanted:
        result.update(values[name])
    if wanted:
        result["inception"] = {"metrics": wanted, "num_fakes": n_inception, "num_reals": len(real_stats.features),
                               "stats_file": stats_file, "weights_sha256": inception.WEIGHTS.sha256,
                               "kid_subsets": settings.kid_subsets,
                               "is_splits": settings.is_splits}
        log.info("evaluate %dpx: %s", res, " ".join(f"{k}={v:.4g}" for name in wanted for k, v in values[name].items()))
    result.update(total_kimg=total_kimg, device=str(device), seconds=round(time.time() - t0, 3))
    return result


def _mlflow_metrics(result: dict) -> dict[str, float]:
    """swd_<px>, swd_avg, swd_real_vs_real_<px>, swd_real_vs_real_avg, msssim_fake, msssim_real, fid<N>, kid<N>,
    kid<N>_std, is<N>, is<N>_std, eval_seconds (whichever were computed)."""
    metrics = dict(result.get("swd", {}))
    metrics.update({f"swd_real_vs_real_{k[len('swd_'):]}": v for k, v in result.get("swd_real_vs_real", {}).items()})
    metrics.update({k: result[k] for k in ("msssim_fake", "msssim_real") if result.get(k) is not None})
    inc = result.get("inception")
    if inc:
        for name in inc["metrics"]:
            key = fid_mod.metric_key(name, inc["num_fakes"])
            metrics.update({k: result[k] for k in (key, f"{key}_std") if k in result})
    metrics["eval_seconds"] = result["seconds"]
    return metrics


RES_FROM_CHECKPOINT = True      # cli.py: --res may be left out when --checkpoint gives the resolution


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", metavar="FILE", help="evaluate this checkpoint instead of a stage's (an "
                        "imported official network, an export, ...) against the pyramid level of its resolution; "
                        "not a DAG stage: writes --out, no MLflow run; a relative path is taken from the project "
                        "root (the folder of --params)")
    parser.add_argument("--out", metavar="FILE.json", help="with --checkpoint: where to write (default: the "
                        "checkpoint's path with .eval.json)")


def run_checkpoint(params, checkpoint_path: str, out: str | None = None, res: int | None = None) -> dict:
    """`progan evaluate --checkpoint FILE`: the metrics of evaluate.metrics for G_ema of FILE (at its alpha) against
    data/pyramid/<its resolution>.npy; written to `out` (default FILE with .eval.json) and returned."""
    from progan import checkpoint

    path = Path(checkpoint_path).absolute()
    device = swd_mod.default_device()
    trained = checkpoint.load_generator(path, device)
    got = trained.G.res_px
    if res is not None and int(res) != got:
        raise ProganError(f"--res {res}: {path} holds a {got} px generator; leave --res out with --checkpoint")
    if got not in params.levels:
        raise ProganError(f"{path}: a {got} px generator, but params.yaml's pyramid (crop.size {params.crop.size}) has "
                          f"levels {', '.join(map(str, params.levels))}; set crop.size: {got} or more and run "
                          f"`progan pyramid`")
    out_path = Path(out) if out else path.with_suffix(".eval.json")
    result = evaluate(params, got, (_open_reals(got), trained), spill_dir=str(out_path.parent))
    result.update(checkpoint=str(path), checkpoint_sha256=sha256_file(path), alpha=trained.alpha)
    write_json(out_path, result)
    log.info("evaluate %s (%d px, alpha %g): %s -> %s", path, got, trained.alpha,
             " ".join(f"{k}={v:.4g}" for k, v in headline.evaluation(result).items()
                      if isinstance(v, (int, float))), out_path)
    return result


def run(params, res: int | None = None, lease=None, checkpoint: str | None = None, out: str | None = None) -> dict:
    """`progan evaluate --res R` (or `--checkpoint FILE`: run_checkpoint). `lease` (gpus.Lease from the CLI) has
    already set CUDA_VISIBLE_DEVICES."""
    if checkpoint is not None:
        return run_checkpoint(params, checkpoint, out, res)
    if out is not None:
        raise ProganError("--out goes with --checkpoint; a stage writes results/<res>/eval.json")
    if res is None:
        raise ProganError("--res R (a stage's checkpoint) or --checkpoint FILE is needed")
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
        write_json(paths.eval_metrics_json(res), headline.evaluation(result))     # what DVC compares
        if tr is not None:
            tr.log_metrics(_mlflow_metrics(result), step_kimg=result["total_kimg"])
    log.info("evaluate %dpx: wrote %s in %.1f s", res, paths.eval_json(res), result["seconds"])
    return result
