"""Pyramid throughput (MB/s written) and training loader throughput (img/s) per resolution.

Crops: the first --n CelebA aligned faces (../shared/data/celeba-aligned-2k), centre-cropped to 178 px and
resized to --size px with PIL (no MTCNN: this times the pyramid, not the detector), written as the crop stage
writes them. Then `progan.data.pyramid.run` builds every level, and `progan.train.data.Batches` + `to_device`
(the training loader) are timed per level at the default batch 16, with and without the prefetch thread, and
with the level held in device memory (`train.data_on_device`; on a CPU that is a copy in RAM).

    .venv/bin/python bench/bench_data.py [--n 2010] [--size 128] [--batches 200]
Writes bench/out/bench_data.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

from progan import params as params_mod, paths  # noqa: E402
from progan.data import pyramid  # noqa: E402
from progan.train import data  # noqa: E402

from helpers import CELEBA_DIR, tiny_params  # noqa: E402

OUT = REPO / "bench" / "out"


def make_crops(root: Path, n: int, size_px: int) -> None:
    folder = root / paths.FACES_IMAGES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(CELEBA_DIR.glob("*.jpg"))[:n]):
        with Image.open(f) as im:
            w, h = im.size
            s = min(w, h)
            box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
            im.convert("RGB").crop(box).resize((size_px, size_px), Image.LANCZOS).save(folder / f"{i:06d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2010)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=200, help="minibatches timed per resolution")
    args = ap.parse_args()
    root = OUT / "data_ws"
    params = params_mod.load(tiny_params(root, size_px=args.size))
    os.chdir(root)
    if len(list(Path(paths.FACES_IMAGES_DIR).glob("*.png"))) != args.n:
        make_crops(root, args.n, args.size)
    t0 = time.perf_counter()
    pyramid.run(params)
    secs = time.perf_counter() - t0
    mb = sum(args.n * r * r * 3 for r in params.resolutions) / 1e6
    result = {"pyramid": {"images": args.n, "size_px": args.size, "MB": round(mb, 1), "seconds": round(secs, 2),
                          "MB_per_s": round(mb / secs, 1)}, "loader": {}}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for r in params.resolutions:
        images = data.open_level(r)
        sampler = data.Sampler(len(images), seed=0, res_px=r, mirror=True)
        row = {}
        for prefetch in (0, 2):
            batches = data.Batches(images, sampler, 16, 0, 16 * args.batches, prefetch=prefetch)
            t0 = time.perf_counter()
            for _, x, flip in batches:
                y = data.to_device(x, flip, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            row[f"img_s_prefetch{prefetch}"] = round(16 * args.batches / (time.perf_counter() - t0))
        resident = data.resident_level(images, device)
        t0 = time.perf_counter()
        for _, x, flip in data.Batches(resident, sampler, 16, 0, 16 * args.batches):
            y = data.to_device(x, flip, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        row["img_s_on_device"] = round(16 * args.batches / (time.perf_counter() - t0))
        del resident
        result["loader"][str(r)] = row
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_data.json").write_text(json.dumps(result, indent=2))
    print(f"pyramid: {args.n} images at {args.size} px -> {mb:.1f} MB in {secs:.2f} s = {mb / secs:.1f} MB/s "
          f"(includes PNG decode)")
    print("loader img/s (batch 16, device " + device.type + "):")
    for r, row in result["loader"].items():
        print(f"  {r:>4} px  no prefetch {row['img_s_prefetch0']:>7}   prefetch thread {row['img_s_prefetch2']:>7}"
              f"   level on the device {row['img_s_on_device']:>7}")


if __name__ == "__main__":
    main()
