"""`make bench`: every benchmark in bench/, one after the other, then one summary table.

Figures depend on the machine and on its load; the README keeps the last table with the machine it ran on.
Each script also writes its own JSON under bench/out/. Budget: about 15 minutes on a 2-core CPU.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RUNS = [
    ("crop (MTCNN, CelebA 178x218)", ["bench_crop.py", "--n", "400", "--threads", "2"]),
    # the 43 real photos (0.06-1 MP) as they are, then enlarged x4 (0.2-18 MP, median 4 MP): ~2 min together
    ("crop (MTCNN, real photos)", ["bench_crop.py", "--images", "../shared/data/photos", "--threads", "2"]),
    ("crop (MTCNN, real photos x4, camera-sized)", ["bench_crop.py", "--images", "../shared/data/photos",
                                                    "--threads", "2", "--upscale", "4"]),
    ("pyramid + loader", ["bench_data.py", "--n", "2010", "--size", "128"]),
    ("training step, old vs new (#17)", ["bench_train.py", "--threads", "2"]),
    # 16,384 images at 128 px: ~3 min on an idle 2-core CPU; the numpy reference runs on 512 and is extrapolated.
    ("SWD 16,384 images at 128 px", ["bench_swd.py"]),
    # 20 SIGKILLs on a tiny train@8, re-run after each, vs an uninterrupted run: ~80 s (mostly interpreter start-up).
    ("crash and resume (train@8, 20 SIGKILLs)", ["bench_kill.py"]),
]


# `make bench-gpu` (python bench/run_all.py --gpu): the issue #6 figures only a GPU shows, in ~8 min on one
# H200-class device: paper nets up to 128 px in fp32 and bf16 (train.amp) and channels_last, SWD on the device,
# MTCNN on the whole 2,010-image set and on camera-sized photos, the loader with the level on the device.
GPU_RUNS = [
    # old (before #17) and new step interleaved: 2 rounds x 2 variants x --paper-steps steps per resolution
    ("training step, paper nets to 128 px, fp32", ["bench_train.py", "--tiny-res", "4", "32", "--paper-res", "4", "8",
                                                   "16", "32", "64", "128", "--steps", "25", "--paper-steps", "10",
                                                   "--reps", "2"]),
    ("training step, paper nets to 128 px, bf16 autocast", ["bench_train.py", "--tiny-res", "--paper-res", "16", "64",
                                                            "128", "--paper-steps", "10", "--reps", "2", "--amp"]),
    ("training step, paper nets, bf16 + channels_last", ["bench_train.py", "--tiny-res", "--paper-res", "64", "128",
                                                         "--paper-steps", "10", "--reps", "2", "--amp",
                                                         "--channels-last"]),
    ("SWD 16,384 images at 128 px on the GPU", ["bench_swd.py", "--device", "cuda", "--ref-images", "256"]),
    ("crop (MTCNN on the GPU, CelebA)", ["bench_crop.py", "--device", "cuda", "--threads", "16"]),
    ("crop (MTCNN on the GPU, photos x4)", ["bench_crop.py", "--device", "cuda", "--threads", "16",
                                            "--images", "../shared/data/photos", "--upscale", "4"]),
    ("pyramid + loader", ["bench_data.py", "--n", "2010", "--size", "128"]),
]


def run_one(title: str, argv: list[str], timeout_s: float | None = None, log=None) -> dict:
    """One benchmark script as a subprocess, its output echoed (and written to `log`): {title, argv, rc, seconds,
    results: the JSON objects it printed, one a line}. rc is None when it ran past timeout_s (then killed)."""
    print(f"\n=== {title}: {' '.join(argv)}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-u", str(BENCH / argv[0]), *argv[1:]], cwd=BENCH.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: list[str] = []
    killed = []
    timer = threading.Timer(timeout_s, lambda: (killed.append(True), proc.kill())) if timeout_s else None
    if timer:
        timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            if log is not None:
                log.write(line)
                log.flush()
        rc = proc.wait()
    finally:
        if timer:
            timer.cancel()
    timed_out = bool(killed)
    seconds = time.time() - t0
    results = []
    for line in lines:
        line = line.strip()
        if line[:1] in "[{":
            try:
                results.append(json.loads(line))
            except ValueError:
                pass
    status = f"ran past {timeout_s:.0f} s: killed" if timed_out else "ok" if rc == 0 else f"FAILED rc={rc}"
    print(f"=== {title}: {status} in {seconds:.0f} s", flush=True)
    return {"title": title, "argv": argv, "rc": None if timed_out else rc, "timed_out": timed_out,
            "seconds": round(seconds, 1), "results": results}


def main() -> int:
    gpu = "--gpu" in sys.argv[1:]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            print("bench/run_all.py --gpu: no CUDA device here; run `make bench` for the CPU figures", file=sys.stderr)
            return 1
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    failed = sum(run_one(title, argv)["rc"] != 0 for title, argv in (GPU_RUNS if gpu else RUNS))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
