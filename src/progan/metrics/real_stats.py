"""The reals' Inception statistics of one pyramid level, their file, and scoring generated images against them.

File `data/fid-stats/<R>.npz` (paths.fid_stats), plain arrays read with allow_pickle=False:
  mu        [2048] float64      mean of the pool_3 features of the reals
  sigma     [2048, 2048] float64  their covariance (ddof=1)
  features  [N, 2048] float32   the features themselves (KID draws its subsets from them)
  meta      JSON string: the settings that made them (KEY_FIELDS, compared on load), the source level, its
            sha256, and `available` (false: a placeholder written when the weights could not be had, with
            `reason`; it holds no arrays and scores nothing).
The reals are the whole level, or a seeded random subset of `evaluate.fid.max_reals` of them (the seed is a
constant, so the file depends on no other params). Written atomically.

`compute_real_stats(level, settings)` makes the file (the `fid-stats@<R>` stage); `score(batches, stats,
settings)` scores generated images against it (what `progan evaluate` does while it generates).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from progan import paths
from progan.errors import ProganError
from progan.fileio import atomic_path, sha256_file
from progan.log import log, progress
from progan.metrics import Rows
from progan.metrics import fid as fid_mod
from progan.metrics import inception

FORMAT = "progan-inception-stats"
VERSION = 1
REAL_SUBSET_SEED = 0                # which reals when the level has more than max_reals (fixed: no param)
INCEPTION_METRICS = ("fid", "kid", "is")      # = pipeline.INCEPTION_METRICS (a test keeps them and the registry equal)
# A placeholder (written without weights) is a fid-stats output like any other: neither front end re-runs fid-stats
# when the weights arrive (where they are is no param: they are pinned by sha256). This re-makes the statistics and
# re-runs what reads them (evaluate at those resolutions, the report); README "Inception weights".
AFTER_WEIGHTS = {"dvc": "dvc repro --force --downstream fid-stats",
                 "snakemake": "snakemake --cores all --forcerun fid_stats"}
# The settings a stats file must match to be used: anything that changes its numbers.
KEY_FIELDS = ("format", "version", "res_px", "num_reals", "subset_seed", "weights_sha256", "feature_extractor")


class StaleStats(ProganError):
    """A stats file that does not belong to these settings or to this pyramid level (one line: which and why)."""


@dataclass(frozen=True)
class InceptionSettings:
    """evaluate.fid.* and evaluate.inception_weights (params.yaml). The reals' statistics need the first five; the
    scoring fields are None in the settings of the fid-stats stage (`from_params(params, scoring=False)`), which
    reads no key it does not use (tests/test_params_read.py)."""
    max_reals: int                  # the reals: the whole level up to this many
    min_res_px: int                 # stages below get no fid/kid/is
    batch: int                      # images per Inception forward
    weights: str | None = None      # evaluate.inception_weights
    cache_dir: str | None = None    # evaluate.fid.cache_dir
    num_images: int | None = None   # generated images scored (named in the key: fid50k)
    kid_subsets: int | None = None
    kid_subset_size: int | None = None
    is_splits: int | None = None
    seed: int | None = None         # KID's subset draws (evaluate.seed)

    @classmethod
    def from_params(cls, params, scoring: bool = True) -> "InceptionSettings":
        f = params.evaluate.fid
        reals = cls(max_reals=int(f.max_reals), min_res_px=int(f.min_res_px), batch=int(f.batch),
                    weights=params.evaluate.inception_weights, cache_dir=f.cache_dir)
        if not scoring:
            return reals
        return dataclasses.replace(reals, num_images=int(f.num_images), kid_subsets=int(f.kid_subsets),
                                   kid_subset_size=int(f.kid_subset_size), is_splits=int(f.is_splits),
                                   seed=int(params.evaluate.seed))

    def key(self, res_px: int, num_level_images: int) -> dict:
        """What a stats file of level `res_px` (holding `num_level_images`) must record to be reused."""
        import torch_fidelity

        return {"format": FORMAT, "version": VERSION, "res_px": int(res_px),
                "num_reals": int(min(self.max_reals, num_level_images)),
                "subset_seed": REAL_SUBSET_SEED if num_level_images > self.max_reals else None,
                "weights_sha256": inception.WEIGHTS.sha256,
                "feature_extractor": f"torch-fidelity {torch_fidelity.__version__} {inception.EXTRACTOR_NAME} 2048"}


@dataclass
class RealStats:
    mu: np.ndarray                  # [2048] float64
    sigma: np.ndarray               # [2048, 2048] float64
    features: np.ndarray            # [N, 2048] float32
    meta: dict


def real_index(num_level_images: int, max_reals: int) -> np.ndarray:
    """Rows of the level that are the reals: all of them, or a fixed random subset, sorted (sequential reads)."""
    if num_level_images <= max_reals:
        return np.arange(num_level_images)
    return np.sort(np.random.default_rng(REAL_SUBSET_SEED).permutation(num_level_images)[:max_reals])


def _open_level(level) -> tuple[np.ndarray, str, str]:
    """(uint8 [N, R, R, 3] array or memmap, its name, its sha256)."""
    if isinstance(level, (str, Path)):
        try:
            arr = np.load(level, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ProganError(f"{level}: not a readable .npy array ({e}); re-run `progan pyramid`") from None
        name, digest = str(level), sha256_file(level)
    else:
        arr, name = np.asarray(level), "(array)"
        digest = _array_sha256(arr)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3 or arr.shape[1] != arr.shape[2]:
        raise ProganError(f"{name}: expected uint8 [N, R, R, 3] images, got {arr.dtype} {list(arr.shape)}")
    if len(arr) < 2:
        raise ProganError(f"{name}: has {len(arr)} image(s); Inception statistics need at least 2")
    return arr, name, digest


def _array_sha256(arr: np.ndarray) -> str:
    import hashlib

    h = hashlib.sha256()
    for start in range(0, len(arr), 1024):
        h.update(np.ascontiguousarray(arr[start:start + 1024]).tobytes())
    return h.hexdigest()


def real_stats_from_level(level: np.ndarray, settings: InceptionSettings, net, device, res_px: int,
                          source: str = "(array)", source_sha256: str | None = None) -> RealStats:
    """Inception statistics of the reals of `level` (in memory; nothing written)."""
    index = real_index(len(level), settings.max_reals)
    reals = fid_mod.FeatureSet(len(index), keep_features=True, device=device)
    rows = Rows(level, index)
    with progress(total=len(index), desc=f"inception {res_px}px: reals", unit="img") as bar:
        fid_mod.extract(net, rows, reals, settings.batch, device, tick=bar.update)
    meta = {**settings.key(res_px, len(level)), "available": True, "source": source,
            "source_sha256": source_sha256, "num_level_images": int(len(level)),
            "weights": inception.WEIGHTS.name}
    return RealStats(reals.mean(), reals.cov(), reals.kept_features(), meta)


def save_real_stats(path: str | Path, stats: RealStats | None, meta: dict | None = None) -> Path:
    """Write the stats (or, with stats None, a placeholder holding only `meta`) atomically."""
    path = Path(path)
    meta = stats.meta if stats is not None else meta
    arrays = {"meta": np.array(json.dumps(meta, sort_keys=True))}
    if stats is not None:
        arrays.update(mu=stats.mu, sigma=stats.sigma, features=np.ascontiguousarray(stats.features, np.float32))
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def read_meta(path: str | Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise StaleStats(f"{path}: not a readable Inception statistics file ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StaleStats(f"{path}: not a {FORMAT} file")
    return meta


def load_real_stats(path: str | Path, settings: InceptionSettings, res_px: int, num_level_images: int,
                    source_sha256: str | None = None) -> RealStats | None:
    """The stats in `path` if they were made with these settings from this level (sha256 compared when given);
    None for a placeholder (no weights when it was made); StaleStats (one line naming the field) otherwise."""
    meta = read_meta(path)
    want = settings.key(res_px, num_level_images)
    for field in KEY_FIELDS:
        if meta.get(field) != want[field]:
            raise StaleStats(f"{path}: made with {field} {meta.get(field)!r}, these settings need {want[field]!r}")
    if not meta.get("available", False):
        return None
    if source_sha256 is not None and meta.get("source_sha256") != source_sha256:
        raise StaleStats(f"{path}: made from another version of its pyramid level (sha256 "
                         f"{str(meta.get('source_sha256'))[:12]}..., the level now {source_sha256[:12]}...)")
    with np.load(path, allow_pickle=False) as z:
        stats = RealStats(z["mu"], z["sigma"], z["features"], meta)
    if stats.mu.shape != (inception.FEATURE_DIM,) or stats.features.shape != (want["num_reals"], inception.FEATURE_DIM):
        raise StaleStats(f"{path}: arrays of the wrong shape (mu {list(stats.mu.shape)}, features "
                         f"{list(stats.features.shape)})")
    return stats


def compute_real_stats(level, settings: InceptionSettings, out_path: str | Path | None = None, net=None,
                       device=None, res_px: int | None = None) -> Path:
    """Inception statistics of a pyramid level (a .npy path or a uint8 [N, R, R, 3] array) -> `out_path`
    (default paths.fid_stats(R)). Without weights (offline, no file): the one line is logged and a placeholder
    is written, so the DAG goes on and SWD / MS-SSIM still land."""
    import torch

    t0 = time.time()
    arr, source, digest = _open_level(level)
    res_px = int(res_px or arr.shape[1])
    out_path = Path(out_path or paths.fid_stats(res_px))
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if res_px < settings.min_res_px:
        raise ProganError(f"{source}: {res_px} px is below evaluate.fid.min_res_px {settings.min_res_px}; "
                          f"no Inception statistics are made for it")
    if net is None:
        try:
            net, _ = inception.load_network(device, settings.weights, settings.cache_dir)
        except inception.WeightsUnavailable as e:
            log.warning("%s", e)
            meta = {**settings.key(res_px, len(arr)), "available": False, "reason": str(e), "source": source,
                    "source_sha256": digest, "num_level_images": int(len(arr))}
            save_real_stats(out_path, None, meta)
            log.warning("inception %dpx: wrote %s as a placeholder (no statistics: evaluate leaves fid/kid/is out); "
                        "once the weights are there, %s", res_px, out_path, after_weights())
            return out_path
    stats = real_stats_from_level(arr, settings, net, device, res_px, source, digest)
    save_real_stats(out_path, stats)
    log.info("inception %dpx: statistics of %d reals -> %s in %.1f s", res_px, len(stats.features), out_path,
             time.time() - t0)
    return out_path


def after_weights() -> str:
    """What to run once the weights are there, for the front end driving this job (both when run by hand)."""
    from progan import pipeline, workspace

    if pipeline.under_dvc():
        which = ["dvc"]
    elif os.environ.get(workspace.DRIVER_ENV) == "snakemake":
        which = ["snakemake"]
    else:
        which = list(AFTER_WEIGHTS)
    return " or ".join(f"`{AFTER_WEIGHTS[w]}`" for w in which) + (" re-makes the statistics and re-runs the "
                                                                   "evaluations that use them")


def run(params, res: int, lease=None) -> Path:
    """The fid-stats@<res> stage: data/pyramid/<res>.npy -> data/fid-stats/<res>.npz (settings: evaluate.fid).
    `lease` (gpus.Lease from the CLI) has already set CUDA_VISIBLE_DEVICES."""
    res = int(res)
    settings = InceptionSettings.from_params(params, scoring=False)
    if res not in params.resolutions or res < settings.min_res_px:
        usable = [r for r in params.resolutions if r >= settings.min_res_px]
        raise ProganError(f"--res {res}: no Inception statistics are made for it; the resolutions >= "
                          f"evaluate.fid.min_res_px {settings.min_res_px} are {', '.join(map(str, usable)) or 'none'}")
    level = paths.pyramid_level(res)
    if not Path(level).is_file():
        raise ProganError(f"{level}: no real images at {res} px; run `progan pyramid` first")
    return compute_real_stats(level, settings, paths.fid_stats(res), res_px=res)


def scores(fakes: fid_mod.FeatureSet, stats: RealStats | None, settings: InceptionSettings,
           metrics: Iterable[str]) -> dict[str, float]:
    """fid<N>, kid<N> and kid<N>_std, is<N> and is<N>_std for the selected metrics (N: settings.num_images)."""
    out: dict[str, float] = {}
    metrics = list(metrics)
    if "fid" in metrics:
        out[fid_mod.metric_key("fid", settings.num_images)] = fid_mod.frechet_distance(
            fakes.mean(), fakes.cov(), stats.mu, stats.sigma)
    if "kid" in metrics:
        mean, std = fid_mod.kid(stats.features, fakes.kept_features(), settings.kid_subsets,
                                settings.kid_subset_size, settings.seed)
        key = fid_mod.metric_key("kid", settings.num_images)
        out.update({key: mean, f"{key}_std": std})
    if "is" in metrics:
        mean, std = fid_mod.inception_score(fakes.kept_logits(), settings.is_splits)
        key = fid_mod.metric_key("is", settings.num_images)
        out.update({key: mean, f"{key}_std": std})
    return out


def fake_feature_set(settings: InceptionSettings, metrics: Iterable[str], device) -> fid_mod.FeatureSet:
    metrics = list(metrics)
    return fid_mod.FeatureSet(settings.num_images, keep_features="kid" in metrics, keep_logits="is" in metrics,
                              device=device)


def score(generated: Iterable[np.ndarray], stats: RealStats | str | Path, settings: InceptionSettings,
          metrics: Iterable[str] = ("fid", "kid"), net=None, device=None) -> dict[str, float]:
    """Score the first settings.num_images generated uint8 [B, R, R, 3] batches against the reals' stats.

    `stats`: a RealStats or a stats file (checked against `settings`). The metric keys name the count asked
    for; fewer generated images is an error (the key would lie)."""
    import torch

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(stats, RealStats):
        meta = read_meta(stats)
        loaded = load_real_stats(stats, settings, meta["res_px"], meta["num_level_images"])
        if loaded is None:
            raise inception.WeightsUnavailable(f"{stats}: holds no statistics ({meta.get('reason')})")
        stats = loaded
    if net is None:
        net, _ = inception.load_network(device, settings.weights, settings.cache_dir)
    metrics = [m for m in metrics if m in INCEPTION_METRICS]
    fakes = fid_mod.extract_all(net, generated, fake_feature_set(settings, metrics, device), settings.batch, device)
    if fakes.n < settings.num_images:
        raise ProganError(f"score: got {fakes.n} generated images, evaluate.fid.num_images is {settings.num_images}")
    return scores(fakes, stats, settings, metrics)
