"""Time SWD: torch (progan.metrics.swd) vs the numpy/scipy port of the official code (swd_reference).

    .venv/bin/python bench/bench_swd.py [--images 16384] [--ref-images 512] [--res 128] [--device cpu]

Images: the real CelebA faces of ../shared/data/celeba-aligned-2k (centre crop, resized to --res), tiled
with random flips up to --images; the second set is the same faces with uniform noise +-20. The torch
version runs on all --images; the numpy version (official algorithm, single-threaded sort, scipy
convolution, every descriptor in RAM) runs on --ref-images and is extrapolated linearly to --images. The
sort is O(M log M), so the linear extrapolation slightly flatters numpy: the speed-up printed is a lower
bound. Both also run on the --ref-images subset and must agree (printed).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from progan.metrics import swd as S  # noqa: E402
from progan.metrics import swd_reference as R  # noqa: E402

CELEBA = Path(__file__).resolve().parents[2] / "shared" / "data" / "celeba-aligned-2k"


def faces(res: int) -> np.ndarray:
    out = []
    for f in sorted(CELEBA.glob("*.jpg")):
        with Image.open(f) as im:
            out.append(np.asarray(im.convert("RGB").crop((0, 20, 178, 198)).resize((res, res), Image.BICUBIC)))
    return np.stack(out)


def image_sets(n: int, res: int) -> tuple[np.ndarray, np.ndarray]:
    base = faces(res)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(base), n)
    a = base[idx]
    flip = rng.random(n) < 0.5
    a[flip] = a[flip, :, ::-1]
    b = a[rng.permutation(n)]
    for s in range(0, n, 1024):     # in chunks: int16 noise for 16k x 128 px would take 1.6 GB at once
        chunk = b[s:s + 1024].astype(np.int16) + rng.integers(-20, 21, b[s:s + 1024].shape, dtype=np.int16)
        b[s:s + 1024] = np.clip(chunk, 0, 255).astype(np.uint8)
    return a, b


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=16384)
    ap.add_argument("--ref-images", type=int, default=512)
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args(argv)
    device = torch.device(args.device) if args.device else S.default_device()
    t = time.perf_counter()
    a, b = image_sets(args.images, args.res)
    print(f"images: 2 x {args.images} at {args.res} px ({time.perf_counter() - t:.1f} s to load); torch "
          f"{torch.__version__} on {device}, {torch.get_num_threads()} threads", flush=True)

    n = args.ref_images
    t = time.perf_counter()
    ref = R.swd(a[:n], b[:n], batch=64)
    t_ref = time.perf_counter() - t
    t = time.perf_counter()
    small = S.swd(a[:n], b[:n], batch=args.batch, device=device)
    t_small = time.perf_counter() - t
    worst = max(abs(small[k] - ref[k]) / abs(ref[k]) for k in ref)
    print(f"{n} images: numpy {t_ref:.1f} s, torch {t_small:.1f} s; max relative difference {worst:.1e}")

    t = time.perf_counter()
    full = S.swd(a, b, batch=args.batch, device=device)
    t_full = time.perf_counter() - t
    t_ref_full = t_ref * args.images / n
    print(f"{args.images} images: torch {t_full:.1f} s (measured); numpy ~{t_ref_full:.0f} s (extrapolated "
          f"linearly from {n}); speed-up >= {t_ref_full / t_full:.1f}x")
    print(json.dumps({"images": args.images, "res_px": args.res, "device": str(device),
                      "torch_s": round(t_full, 1), "numpy_s_extrapolated": round(t_ref_full, 1),
                      "numpy_s_measured": round(t_ref, 1), "numpy_images": n, "swd": full}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
