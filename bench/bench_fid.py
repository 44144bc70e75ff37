"""Time FID / KID on this machine with torch-fidelity's TF-Inception network (progan.metrics).

    .venv/bin/python bench/bench_fid.py [--n 2000 10000] [--res 64] [--device cpu] [--weights PATH] [--batch 64]

For each N: the reals' statistics of N CelebA faces (what the fid-stats stage does once per resolution), then N
"generated" images (the same faces with noise +-20 and flips) scored against them (what every evaluate does), the
Inception pass and the formulas (FID: eigenvalues of a 2048 x 2048 product; KID: 100 subsets of 1000) timed
apart. --skip-reals N... times the reals only for the sizes not listed (their cost per image is the same pass).

Weights: the published ones when they are in the cache (or --weights); otherwise, as on a machine without
internet, the same architecture with random weights: the same FLOPs and memory, so the same seconds, but the
FID values printed are then meaningless (said in the output). Images: ../shared/data/celeba-aligned-2k tiled
with random flips up to N.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from progan.metrics import fid as F  # noqa: E402
from progan.metrics import inception  # noqa: E402
from progan.metrics import real_stats as RS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_swd import faces  # noqa: E402


def network(device, weights: str | None):
    """(torch-fidelity's InceptionV3 with the published weights, 'published') or, when they cannot be had,
    (the same network with its default random init, 'random: <why>')."""
    try:
        net, source = inception.load_network(device, weights)
        return net, f"published ({source})"
    except inception.WeightsUnavailable as e:
        import torch_fidelity.feature_extractor_inceptionv3 as fe

        empty = io.BytesIO()
        torch.save({}, empty)
        empty.seek(0)
        with mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
            net = fe.FeatureExtractorInceptionV3(inception.EXTRACTOR_NAME, list(inception.FEATURES),
                                                 feature_extractor_weights_path=empty)
        return net.to(device).eval(), f"RANDOM (same architecture and FLOPs; FID values meaningless): {e}"


def image_set(n: int, base: np.ndarray, seed: int, noise: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = base[rng.integers(0, len(base), n)]
    flip = rng.random(n) < 0.5
    a[flip] = a[flip, :, ::-1]
    if noise:
        for s in range(0, n, 1024):
            chunk = a[s:s + 1024].astype(np.int16) + rng.integers(-noise, noise + 1, a[s:s + 1024].shape, dtype=np.int16)
            a[s:s + 1024] = np.clip(chunk, 0, 255).astype(np.uint8)
    return a


def extract(net, images, batch, device, keep_features: bool) -> tuple[F.FeatureSet, float]:
    fs = F.FeatureSet(len(images), keep_features=keep_features, device=device)
    t = time.perf_counter()
    F.extract(net, images, fs, batch, device)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return fs, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2000, 10000])
    ap.add_argument("--res", type=int, default=64, help="image size before Inception's resize to 299 (default 64)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--weights", default=None, help="the weights file (default: the cache, as evaluate)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--skip-reals", type=int, nargs="*", default=[],
                    help="sizes whose reals are not timed (the same pass per image as the fakes)")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net, weights = network(device, args.weights)
    base = faces(args.res)
    print(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads; Inception weights: {weights}",
          flush=True)
    with torch.no_grad():                                              # warm-up (allocator, kernels)
        net(torch.from_numpy(base[:4]).to(device).permute(0, 3, 1, 2))
    rows = []
    for n in args.n:
        fakes = image_set(n, base, seed=1, noise=20)
        f_set, t_fakes = extract(net, fakes, args.batch, device, keep_features=True)
        print(f"N={n}: Inception on {n} generated images {t_fakes:.1f} s ({n / t_fakes:.1f} img/s)", flush=True)
        if n in args.skip_reals:
            r_set, t_reals = f_set, None
        else:
            r_set, t_reals = extract(net, image_set(n, base, seed=0, noise=0), args.batch, device, keep_features=True)
            print(f"N={n}: Inception on {n} reals {t_reals:.1f} s ({n / t_reals:.1f} img/s)", flush=True)
        t = time.perf_counter()
        fid = F.frechet_distance(f_set.mean(), f_set.cov(), r_set.mean(), r_set.cov())
        t_fid = time.perf_counter() - t
        t = time.perf_counter()
        kid = F.kid(r_set.kept_features(), f_set.kept_features(), 100, 1000, 123)
        t_kid = time.perf_counter() - t
        row = {"n": n, "device": str(device), "weights": weights.split(" ")[0], "inception_fakes_s": round(t_fakes, 1),
               "inception_reals_s": None if t_reals is None else round(t_reals, 1), "fid_formula_s": round(t_fid, 2),
               "kid_formula_s": round(t_kid, 2), "img_per_s": round(n / t_fakes, 1),
               "evaluate_fid_kid_s": round(t_fakes + t_fid + t_kid, 1), "fid": fid, "kid": kid[0]}
        print(f"N={n}: FID formula {t_fid:.2f} s, KID (100 x 1000) {t_kid:.2f} s; per evaluate with the reals' "
              f"stats cached: {row['evaluate_fid_kid_s']:.0f} s" + ("" if t_reals is None else
              f"; the reals once: {t_reals:.0f} s") + f" (fid {fid:.4g}, kid {kid[0]:.4g})", flush=True)
        rows.append(row)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
