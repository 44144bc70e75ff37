"""Time the crop stage: MTCNN detection alone (per torch thread count) and the whole `progan crop` stage.

    .venv/bin/python bench/bench_crop.py [--n 2010] [--threads 1,2] [--device cpu] [--size 128] [--no-stage]
    .venv/bin/python bench/bench_crop.py --images ../shared/data/photos [--upscale 4]

Images: the aligned CelebA JPEGs of ../shared/data/celeba-aligned-2k (178x218), first --n in sorted order;
or any folder of images (--images), e.g. the 43 real photos of ../shared/data/photos (0.06-1 MP), optionally
enlarged --upscale times (bicubic, saved as JPEG quality 90 in a temp folder) to time camera-sized inputs
(x4: 1-16 MP, median ~4 MP), which the stage detects on a downscaled copy.
1. decode: load_rgb in the stage's decoder threads (img/s).
2. detect: MTCNN(min_face_px=--min-face-px).detect on batches of --batch decoded images, once per --threads value;
   wall img/s and CPU ms per image (the CPU figure is steadier than wall time on a shared machine). The
   first batch is a warm-up and is not timed.
3. stage: `progan crop` (faces.run) on the same images in a temporary project with the repo's params.yaml
   (crop.size = --size): wall img/s and kept fraction.
The load average before and after is printed: other users of the machine slow every figure down.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from progan import log, params as params_mod  # noqa: E402
from progan.data import faces  # noqa: E402
from progan.data.images import load_rgb  # noqa: E402
from progan.data.mtcnn import MTCNN  # noqa: E402

CELEBA = ROOT.parent / "shared" / "data" / "celeba-aligned-2k"
SUFFIXES = (".jpg", ".jpeg", ".png")


def load_all(files: list[Path]) -> tuple[list, float]:
    t = time.perf_counter()
    with ThreadPoolExecutor(faces.DECODE_WORKERS) as pool:
        images = list(pool.map(load_rgb, files))
    return images, len(files) / (time.perf_counter() - t)


def bench_detect(images: list, batch: int, threads: int, device: str | None, min_face_px: int) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        det = MTCNN(min_face_px=min_face_px, device=device)
        det.detect(images[:batch])                                  # warm-up (oneDNN primitives, caches)
        if det.device.type == "cuda":
            torch.cuda.synchronize()
        t, cpu = time.perf_counter(), time.process_time()
        found = 0
        for k in range(0, len(images), batch):
            found += sum(1 for faces_ in det.detect(images[k:k + batch]) if any(f.score >= 0.9 for f in faces_))
        if det.device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    finally:
        torch.set_num_threads(before)
    return {"threads": threads, "device": str(det.device), "img_per_s": round(len(images) / wall, 1),
            "cpu_ms_per_img": round(1000 * cpu / len(images), 1), "with_face_p09": found}


def bench_stage(files: list[Path], size_px: int, min_face_px: int) -> dict:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data = copy.deepcopy(data)
    data["crop"].update(size=size_px, min_face_px=min_face_px)
    data["train"]["stages"] = {k: v for k, v in data["train"]["stages"].items() if int(k) <= size_px}
    with tempfile.TemporaryDirectory(prefix="bench_crop_") as tmp:
        root = Path(tmp)
        (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        (root / "data" / "raw").mkdir(parents=True)
        (root / "data" / "raw" / "images.tsv").write_text("path\tbytes\n" + "".join(f"{f}\t0\n" for f in files))
        t = time.perf_counter()
        summary = faces.run(params_mod.load(root / "params.yaml"))
        wall = time.perf_counter() - t
    return {"img_per_s": round(len(files) / wall, 1), "kept": summary["kept"], "images": summary["images"],
            "kept_fraction": round(summary["kept"] / summary["images"], 4), "reasons": summary["reasons"],
            "size_px": size_px}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=Path, default=CELEBA, help="folder of JPEGs (default: celeba-aligned-2k)")
    ap.add_argument("--n", type=int, default=2010, help="images to use (first n in sorted order)")
    ap.add_argument("--batch", type=int, default=32, help="images per detect() call (crop.batch_images)")
    ap.add_argument("--threads", default="1,2", help="torch CPU thread counts to time detection with")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--size", type=int, default=128, help="crop.size for the stage run")
    ap.add_argument("--no-stage", action="store_true", help="skip the full-stage run")
    ap.add_argument("--min-face-px", type=int, default=20, help="crop.min_face_px (params.yaml default 20)")
    ap.add_argument("--upscale", type=int, default=1, help="enlarge every image this many times first")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    log.setup()
    files = sorted(f for f in args.images.iterdir() if f.suffix.lower() in SUFFIXES)[: args.n]
    with tempfile.TemporaryDirectory(prefix="bench_crop_big_") as tmp:
        if args.upscale > 1:
            files = upscaled(files, args.upscale, Path(tmp))
        return run(args, files)


def upscaled(files: list[Path], factor: int, folder: Path) -> list[Path]:
    out = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            big = im.resize((im.width * factor, im.height * factor), Image.BICUBIC)
        out.append(folder / f"{f.stem}.jpg")
        big.save(out[-1], quality=90)
    mp = sorted(Image.open(f).size[0] * Image.open(f).size[1] / 1e6 for f in out)
    print(f"upscaled x{factor}: {mp[0]:.1f}-{mp[-1]:.1f} MP, median {mp[len(mp) // 2]:.1f} MP", flush=True)
    return out


def run(args, files: list[Path]) -> int:
    load_before = os.getloadavg()
    print(f"{len(files)} images from {args.images}; {os.cpu_count()} CPUs, load average {load_before[0]:.1f}; "
          f"torch {torch.__version__}", flush=True)
    images, decode_rate = load_all(files)
    print(f"decode: {decode_rate:.0f} img/s ({faces.DECODE_WORKERS} threads)", flush=True)
    results = {"images": len(files), "cpus": os.cpu_count(), "decode_img_per_s": round(decode_rate, 1), "detect": []}
    for threads in (int(t) for t in args.threads.split(",")):
        r = bench_detect(images, args.batch, threads, args.device, args.min_face_px)
        results["detect"].append(r)
        print(f"detect ({r['device']}, {threads} torch threads, batches of {args.batch}): {r['img_per_s']} img/s, "
              f"{r['cpu_ms_per_img']} CPU ms/img; {r['with_face_p09']}/{len(images)} with a face at p >= 0.9",
              flush=True)
    if not args.no_stage:
        r = bench_stage(files, args.size, args.min_face_px)
        results["stage"] = r
        print(f"stage (progan crop, {args.size} px): {r['img_per_s']} img/s, kept {r['kept']}/{r['images']} "
              f"({r['kept_fraction']:.2%}); skipped: {r['reasons']}", flush=True)
    results["load_average_before_after"] = [round(load_before[0], 1), round(os.getloadavg()[0], 1)]
    print(f"load average: {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after (shared machine)")
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
