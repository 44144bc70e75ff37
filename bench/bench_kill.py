"""Crash and resume, 20 times: SIGKILL one real `progan train --res 8` at random moments, re-run it after each
kill, and compare the final checkpoint with an uninterrupted run's (issue #7).

Tiny nets (latent 16, fmap_base 64, fmap_max 16) on the CPU, one intra-op thread, train.deterministic; a 4 and
8 px pyramid from real CelebA images (../shared/data/celeba-aligned-2k); stage 8 = --kimg (half fade-in, half
stabilise), a snapshot every --snapshot-kimg, a log line every --tick-kimg (how far a killed run had got).
Each kill lands u * window after that run's training loop starts (its "train 8 px on cpu" line: interpreter,
imports and snapshot loading done), u ~ U(0, 1) seeded, window = the uninterrupted run's time for --window-kimg
of training (default 3 snapshot intervals), so the 20 kills spread over the stage, across the fade-in /
stabilise boundary (where Adam is reset), and each run gets on average about one snapshot further. A run that
ends before its kill, or is killed after writing its checkpoint (as the interpreter exits), ends the series.
tests/test_kill.py kills at any moment, start-up included.
Reports: bit-identical yes/no (checkpoint tensors and bytes, samples.png, losses.tsv without timings), kimg lost
per kill (last logged kimg minus the snapshot the next run resumes from: work redone, low by up to one tick),
and the wall-clock overhead of all runs against the uninterrupted one.

    .venv/bin/python bench/bench_kill.py [--kills 20] [--kimg 4.0] [--snapshot-kimg 0.1] [--window-kimg 0.3]
Writes bench/out/bench_kill.json; exits 1 unless bit-identical. Also run by `make bench` (~80 s on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402  (its make_root: a pyramid of real CelebA faces)

OUT = REPO / "bench" / "out"
PROGAN = str(Path(sys.executable).with_name("progan"))
NO_MLFLOW = "sqlite:////proc/progan-no-mlflow/mlflow.db"     # fails in milliseconds: MLflow stays out of the way
TICK = re.compile(r"train 8px kimg ([0-9.]+) \(total")
LOOP_START = "train 8 px on "


def make_root(root: Path, n_images: int, kimg: float, snapshot_kimg: float, tick_kimg: float) -> Path:
    """params.yaml (crop.size 8, tiny nets, CPU) + data/pyramid/{4,8}.npy from real CelebA (bench_train.make_root)."""
    if root.exists():
        shutil.rmtree(root)
    params_path = bench_train.make_root(root, 8, n_images, bench_train.CONFIGS["tiny"], batch=8)
    p = yaml.safe_load(params_path.read_text())
    p["train"].update(gpus=0, prefetch=0, deterministic=True, snapshot_kimg=snapshot_kimg, tick_kimg=tick_kimg,
                      stages={"4": {"batch": 8, "lr": 0.001, "transition_kimg": 0, "stabilize_kimg": 0.1},
                              "8": {"batch": 8, "lr": 0.001, "transition_kimg": kimg / 2, "stabilize_kimg": kimg / 2}})
    p["mlflow"]["tracking_uri"] = NO_MLFLOW
    params_path.write_text(yaml.safe_dump(p, sort_keys=False))
    return params_path


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": NO_MLFLOW,
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}


def run_train(params: Path, res: int, kill_after_s: float | None = None) -> dict:
    """One `progan train` process, SIGKILLed `kill_after_s` after its training loop starts unless it ends first.
    Returns rc, wall_s, loop_start_s, kill_s (since the start), last_kimg (last tick line)."""
    cmd = [PROGAN, "train", "--res", str(res), "--params", str(params)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = {"loop": None, "kimg": 0.0, "text": []}

    def read():
        for line in iter(proc.stderr.readline, b""):
            text = line.decode(errors="replace")
            if seen["loop"] is None and LOOP_START in text:
                seen["loop"] = time.monotonic() - t0
            seen["text"].append(text)
            if m := TICK.search(text):
                seen["kimg"] = float(m.group(1))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    kill_s = None
    if kill_after_s is not None:
        while proc.poll() is None and (seen["loop"] is None or time.monotonic() - t0 < seen["loop"] + kill_after_s):
            time.sleep(0.002)
        if proc.poll() is None:
            proc.kill()
            kill_s = time.monotonic() - t0
    rc = proc.wait()
    wall_s = time.monotonic() - t0
    reader.join(timeout=10)
    if rc not in (0, -9):
        sys.exit(f"progan train --res {res} failed (rc {rc}):\n{''.join(seen['text'][-20:])}")
    return {"rc": rc, "wall_s": wall_s, "loop_start_s": seen["loop"] or wall_s, "kill_s": kill_s,
            "last_kimg": seen["kimg"], "stderr": "".join(seen["text"])}


def snapshot_kimg(root: Path) -> float:
    snap = root / "results/8/.resume/snapshot.pt"
    if not snap.exists():
        return 0.0
    return torch.load(snap, weights_only=True)["cur_nimg"] / 1000


def loss_columns(path: Path) -> list:
    return [line.split("\t")[:9] for line in path.read_text().splitlines()]   # all but img_s, seconds


def same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_tensors, a, b))
    return a == b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--kimg", type=float, default=4.0, help="stage 8 length (fade-in + stabilise)")
    ap.add_argument("--snapshot-kimg", type=float, default=0.1)
    ap.add_argument("--window-kimg", type=float, default=0.3, help="kills land within this much training")
    ap.add_argument("--tick-kimg", type=float, default=0.016, help="log interval (2 minibatches of 8)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    root = OUT / "kill"
    params = make_root(root, args.images, args.kimg, args.snapshot_kimg, args.tick_kimg)
    if run_train(params, 4)["rc"] != 0:
        sys.exit("train --res 4 failed")

    ref = run_train(params, 8)
    shutil.move(root / "results/8", root / "ref8")
    start_s, work_s = ref["loop_start_s"], ref["wall_s"] - ref["loop_start_s"]
    window_s = work_s * args.window_kimg / args.kimg
    print(f"uninterrupted: {ref['wall_s']:.2f} s ({start_s:.2f} s until the training loop, {work_s:.2f} s of "
          f"training for {args.kimg} kimg); kills within {window_s:.2f} s of each run's loop start", flush=True)

    rng = random.Random(args.seed)
    kills, runs_s, done = [], [], False
    for k in range(args.kills):
        resume_kimg = snapshot_kimg(root)
        delay_s = rng.random() * window_s
        r = run_train(params, 8, kill_after_s=delay_s)
        at = f"{delay_s:.2f} s into training ({r['kill_s'] or r['wall_s']:.2f} s after start)"
        runs_s.append(r["wall_s"])
        if r["rc"] == 0:
            print(f"kill {k + 1}: the run ended before its kill at {at}; series over", flush=True)
            done = True
            break
        after = snapshot_kimg(root)
        if (root / "results/8/checkpoint.pt").exists() and not (root / "results/8/.resume").exists():
            print(f"kill {k + 1}: landed at {at}, after the stage had finished; series over", flush=True)
            done = True
            break
        got = max(r["last_kimg"], resume_kimg)
        kills.append({"kill": k + 1, "after_loop_start_s": round(delay_s, 3), "after_start_s": round(r["kill_s"], 3),
                      "resumed_from_kimg": resume_kimg,
                      "reached_kimg": got, "snapshot_after_kimg": after, "lost_kimg": round(max(got - after, 0.0), 3)})
        print(f"kill {k + 1:2d} at {at}: resumed from kimg {resume_kimg:.3f}, reached >= {got:.3f}, "
              f"snapshot on disk {after:.3f}, lost {kills[-1]['lost_kimg']:.3f} kimg", flush=True)
    if not done:
        final = run_train(params, 8)
        runs_s.append(final["wall_s"])
        if final["rc"] != 0:
            sys.exit("the final run failed")

    a = torch.load(root / "ref8/checkpoint.pt", weights_only=True)
    b = torch.load(root / "results/8/checkpoint.pt", weights_only=True)
    checks = {
        "checkpoint_tensors": same_tensors(a, b),
        "checkpoint_bytes": (root / "ref8/checkpoint.pt").read_bytes() == (root / "results/8/checkpoint.pt")
        .read_bytes(),
        "samples_png": (root / "ref8/samples.png").read_bytes() == (root / "results/8/samples.png").read_bytes(),
        "losses_tsv": loss_columns(root / "ref8/losses.tsv") == loss_columns(root / "results/8/losses.tsv"),
        "no_resume_state_left": not (root / "results/8/.resume").exists(),
        "no_temp_files_left": not [p for p in root.rglob(".*.tmp*")],
    }
    lost = [k["lost_kimg"] for k in kills]
    total_s = sum(runs_s)
    summary = {
        "kills": len(kills), "runs": len(runs_s), "bit_identical": all(checks.values()), "checks": checks,
        "kimg_lost_per_kill_mean": round(float(np.mean(lost)), 4) if lost else 0.0,
        "kimg_lost_per_kill_max": round(float(np.max(lost)), 4) if lost else 0.0,
        "kimg_lost_total": round(float(np.sum(lost)), 3), "stage_kimg": args.kimg, "snapshot_kimg": args.snapshot_kimg,

        "uninterrupted_s": round(ref["wall_s"], 2), "all_runs_s": round(total_s, 2),
        "overhead_s": round(total_s - ref["wall_s"], 2), "overhead_x": round(total_s / ref["wall_s"], 2),
        "startup_s_per_run": round(start_s, 2), "window_kimg": args.window_kimg,
    }
    meta = {"torch": torch.__version__, "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "seed": args.seed,
            "note": "shared machine: seconds vary with load"}
    OUT.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "summary": summary, "kills": kills}
    (OUT / "bench_kill.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"bit-identical to the uninterrupted run: {'yes' if summary['bit_identical'] else 'NO'} {checks}")
    print(f"{len(kills)} kills, {len(runs_s)} runs: kimg lost per kill mean {summary['kimg_lost_per_kill_mean']:.3f} "
          f"max {summary['kimg_lost_per_kill_max']:.3f} (snapshot every {args.snapshot_kimg} kimg), "
          f"{summary['kimg_lost_total']:.2f} kimg redone of {args.kimg}")
    print(f"wall: uninterrupted {ref['wall_s']:.1f} s, all runs {total_s:.1f} s: "
          f"overhead {summary['overhead_s']:.1f} s "
          f"({summary['overhead_x']:.1f}x; {start_s:.1f} s of start-up per run)")
    print(json.dumps(meta))
    sys.exit(0 if summary["bit_identical"] else 1)


if __name__ == "__main__":
    main()
