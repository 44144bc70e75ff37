"""The crop stage's peak memory on huge photos and its speed on CelebA, old code vs new, in one run (issue #33).

    .venv/bin/python bench/bench_crop_memory.py --old REV [--big 16] [--big-px 9000] [--n 400] [--rounds 2]

`--old REV`: the code to compare with, a git revision of this checkout (its src/ is exported with `git archive`
into a temp folder); e.g. the last commit before #33. Every run is `progan crop` (faces.run) in its own
subprocess on a temporary project (the repo's params.yaml, crop.size 128, crop.detector mtcnn-torch), with
PYTHONPATH pointing at the old or the new src/.
1. memory: --big JPEGs of --big-px x --big-px px (CelebA faces enlarged, bicubic, quality 90; one face filling
   most of each, as a close-up photo), cropped at each crop.batch_images of --new-batches (new code) and
   --old-batches (old code: its read-ahead holds 3 x batch full-size images, 243 MB each at 9000 px, so the
   default 32 would need ~31 GB; it runs at 1 only unless asked). Peak RSS of the stage process (wait4's
   ru_maxrss); a watchdog kills a run that passes --kill-gb (reported as such), to spare a shared machine.
2. speed: the first --n images of ../shared/data/celeba-aligned-2k at the default crop.batch_images, old and new
   interleaved for --rounds rounds (wall s and img/s of each run), then the two runs' crops compared byte for byte.
3. the 43 photos of ../shared/data/photos, old and new once each: manifests (scores, boxes, landmarks) and crops
   compared byte for byte (their detections must not change).
The load average is printed before and after: other users of the machine slow every figure down.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CELEBA = ROOT.parent / "shared" / "data" / "celeba-aligned-2k"
PHOTOS = ROOT.parent / "shared" / "data" / "photos"
STAGE = ("import sys, time; from progan import log, params; from progan.data import faces; log.setup(); "
         "t = time.perf_counter(); s = faces.run(params.load(sys.argv[1])); "
         "print('RESULT', s['kept'], s['images'], time.perf_counter() - t, flush=True)")


def export_src(rev: str, folder: Path) -> Path:
    """src/ of git revision `rev`, written under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder / "src"


def big_images(n: int, side_px: int, folder: Path) -> list[Path]:
    out = []
    for f in sorted(CELEBA.glob("*.jpg"))[:n]:
        path = folder / f"{f.stem}_{side_px}.jpg"
        with Image.open(f) as im:
            im.convert("RGB").resize((side_px, side_px), Image.Resampling.BICUBIC).save(path, quality=90)
        out.append(path)
    return out


def project(folder: Path, files: list[Path], batch_images: int) -> Path:
    """A project folder with the repo's params.yaml (crop.size 128, mtcnn-torch) and images.tsv listing `files`."""
    data = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    data["crop"].update(size=128, detector="mtcnn-torch", batch_images=batch_images)
    data["train"]["stages"] = {k: v for k, v in data["train"]["stages"].items() if int(k) <= 128}
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (folder / "data" / "raw").mkdir(parents=True)
    (folder / "data" / "raw" / "images.tsv").write_text("path\tbytes\n" + "".join(f"{f}\t0\n" for f in files))
    return folder / "params.yaml"


def _rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2**20
    except (OSError, StopIteration):
        return 0.0


def run_stage(src: Path, params_path: Path, kill_gb: float) -> dict:
    """faces.run in a subprocess on `src`: {seconds, kept, images, peak_gb, killed}."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.Popen([sys.executable, "-c", STAGE, str(params_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    killed, done = threading.Event(), threading.Event()

    def watchdog():                              # reads /proc only: the child is reaped by wait4 below, not here
        while not done.wait(0.05):
            if _rss_gb(proc.pid) > kill_gb:
                killed.set()
                os.kill(proc.pid, 9)

    threading.Thread(target=watchdog, daemon=True).start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = {"peak_gb": round(usage.ru_maxrss / 2**20, 2), "killed": killed.is_set(), "rc": proc.returncode}
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if line:
        kept, images, seconds = line.split()[1:]
        result.update(kept=int(kept), images=int(images), seconds=round(float(seconds), 1),
                      img_per_s=round(int(images) / float(seconds), 1))
    return result


def same_crops(a: Path, b: Path) -> tuple[int, int]:
    """(identical crops, crops) between two data/faces folders, and the manifests compared too."""
    fa, fb = sorted((a / "images").iterdir()), sorted((b / "images").iterdir())
    same = sum(x.name == y.name and x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))
    manifests = (a / "manifest.csv").read_bytes() == (b / "manifest.csv").read_bytes()
    return (same if manifests and len(fa) == len(fb) else -1), max(len(fa), len(fb))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="git revision of the old code (e.g. the last commit before #33)")
    ap.add_argument("--big", type=int, default=16, help="number of huge images (default 16)")
    ap.add_argument("--big-px", type=int, default=9000, help="their side in px (default 9000: 81 Mpx)")
    ap.add_argument("--new-batches", default="32,1", help="crop.batch_images values for the new code (default 32,1)")
    ap.add_argument("--old-batches", default="1", help="crop.batch_images values for the old code (default 1)")
    ap.add_argument("--kill-gb", type=float, default=8.0, help="kill a run whose RSS passes this (default 8)")
    ap.add_argument("--n", type=int, default=400, help="CelebA images for the speed runs (default 400)")
    ap.add_argument("--rounds", type=int, default=2, help="old/new speed rounds, interleaved (default 2)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "crop_memory.json")
    args = ap.parse_args(argv)
    load = [os.getloadavg()[0]]
    results = {"old": args.old, "cpus": os.cpu_count(), "memory": [], "speed": []}
    with tempfile.TemporaryDirectory(prefix="bench_crop_memory_") as tmp:
        tmp = Path(tmp)
        srcs = {"old": export_src(args.old, tmp / "old"), "new": ROOT / "src"}
        t = time.perf_counter()
        (tmp / "big").mkdir()
        big = big_images(args.big, args.big_px, tmp / "big")
        mb = sum(f.stat().st_size for f in big) / 1e6
        print(f"{len(big)} JPEGs of {args.big_px}x{args.big_px} px ({mb:.0f} MB) made in {time.perf_counter() - t:.0f} s; "
              f"load average {load[0]:.1f}", flush=True)
        runs = [("new", int(b)) for b in args.new_batches.split(",") if b] + \
               [("old", int(b)) for b in args.old_batches.split(",") if b]
        for k, (code, batch) in enumerate(runs):
            r = run_stage(srcs[code], project(tmp / f"m{k}", big, batch), args.kill_gb)
            r.update(code=code, batch_images=batch, images_px=args.big_px)
            results["memory"].append(r)
            print(f"memory: {code} code, crop.batch_images {batch}: peak {r['peak_gb']} GB"
                  + (f" (killed over {args.kill_gb} GB)" if r["killed"] else
                     f", {r.get('seconds')} s, kept {r.get('kept')}/{r.get('images')}"), flush=True)
        files = sorted(CELEBA.glob("*.jpg"))[: args.n]
        folders = {}
        for rnd in range(args.rounds):
            for code in (("old", "new") if rnd % 2 == 0 else ("new", "old")):
                params_path = project(tmp / f"s{rnd}{code}", files, 32)
                r = run_stage(srcs[code], params_path, args.kill_gb)
                r.update(code=code, round=rnd)
                results["speed"].append(r)
                folders.setdefault(code, params_path.parent / "data" / "faces")
                print(f"speed: round {rnd}, {code} code: {r.get('img_per_s')} img/s ({r.get('seconds')} s, "
                      f"kept {r.get('kept')}/{r.get('images')}), peak {r['peak_gb']} GB", flush=True)
        same, total = same_crops(folders["old"], folders["new"])
        results["celeba_crops_identical"] = [same, total]
        print(f"CelebA crops identical old vs new: {same} of {total} (manifest.csv identical: {same >= 0})")
        photos = sorted(f for f in PHOTOS.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        for code in ("old", "new"):
            r = run_stage(srcs[code], project(tmp / f"p{code}", photos, 32), args.kill_gb)
            print(f"photos: {code} code: {r.get('seconds')} s, kept {r.get('kept')}/{r.get('images')}", flush=True)
        same, total = same_crops(tmp / "pold" / "data" / "faces", tmp / "pnew" / "data" / "faces")
        results["photo_crops_identical"] = [same, total]
        print(f"photo crops identical old vs new: {same} of {total} (manifest.csv identical: {same >= 0})")
    load.append(os.getloadavg()[0])
    results["load_average_before_after"] = [round(x, 1) for x in load]
    print(f"load average: {load[0]:.1f} before, {load[1]:.1f} after (shared machine)")
    print(json.dumps(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
