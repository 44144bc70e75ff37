"""A/B of train.gp_resolution (issue #13): SWD after training 4 -> 32 px with the penalty measured at the dataset
resolution (official: the norm of the gradient w.r.t. the f-times upscaled image, ||grad|| / f, f = 32 / R) or at
the stage's own resolution (`native`, f = 1), everything else equal: same data, nets, seeds and kimg.

Data: ../shared/data/celeba-aligned-2k (2,010 real CelebA faces), cropped with the official fixed CelebA box
(`celeba-box`) and the pyramid stage, once. Nets: `--nets tiny` (the tests' latent 16, fmap_base 64, fmap_max 16:
what a shared 2-core CPU trains in minutes) or `demo` (latent 64, fmap_base 256, fmap_max 64, ~15x the work),
batch 16, `--kimg` per phase (stage 4: stabilise only), the demo's other settings (G_ema decay 0.99). Each run goes through the real CLI (`progan train`, `progan evaluate`)
in its own project folder under bench/out/gp_resolution/. SWD (x1e3) on all 2,010 reals vs as many fakes,
evaluated after every stage; at 32 px the average of the 32 and 16 px levels.

    .venv/bin/python bench/bench_gp_resolution.py [--kimg 4] [--seeds 0 1] [--nets tiny] [--threads 2]

Writes bench/out/gp_resolution/results.json and prints a table. CPU, tens of minutes: run it by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from progan import demo

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "gp_resolution"
CELEBA = REPO.parent / "shared" / "data" / "celeba-aligned-2k"
PROGAN = str(Path(sys.executable).with_name("progan"))
RES = [4, 8, 16, 32]
NETS = {"tiny": dict(latent_dim=16, fmap_base=64, fmap_max=16), "demo": dict(latent_dim=64, fmap_base=256, fmap_max=64)}


def params_for(seed: int, gp_resolution: str, kimg: float, nets: str = "tiny") -> dict:
    p = yaml.safe_load(demo.template())
    p["seed"] = seed
    p["model"].update(NETS[nets])
    p["data"].update(source="folder", folder=str(CELEBA), max_images=None)
    p["crop"].update(detector="celeba-box", size=32)
    p["train"].update(gpus=0, gp_resolution=gp_resolution, tick_kimg=1, snapshot_kimg=1000, prefetch=0)
    p["train"]["stages"] = {str(r): {"batch": 16, "lr": 0.001, "transition_kimg": 0 if r == 4 else kimg,
                                     "stabilize_kimg": kimg} for r in RES}
    p["evaluate"].update(num_images=2010, msssim_pairs=0)
    p["mlflow"]["tracking_uri"] = "sqlite:////proc/progan-no-mlflow/mlflow.db"   # MLflow off (fails in ms): timing
    return p


def progan(root: Path, *args: str, env: dict) -> None:
    proc = subprocess.run([PROGAN, *args, "--params", str(root / "params.yaml")], cwd=root, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed in {root}:\n{proc.stderr[-3000:]}")


def prepare_data(env: dict, kimg: float) -> Path:
    """crop + pyramid once (the same faces for every run); runs link to it."""
    root = OUT / "data"
    if not (root / "data" / "pyramid" / "32.npy").is_file():
        root.mkdir(parents=True, exist_ok=True)
        (root / "params.yaml").write_text(yaml.safe_dump(params_for(0, "dataset", kimg), sort_keys=False))
        for stage in ("download", "crop", "pyramid"):
            progan(root, stage, env=env)
    return root / "data"


def run_one(seed: int, gp_resolution: str, kimg: float, nets: str, data_dir: Path, env: dict) -> dict:
    root = OUT / f"{gp_resolution}-seed{seed}"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params_for(seed, gp_resolution, kimg, nets), sort_keys=False))
    (root / "data").symlink_to(data_dir)
    out = {"seed": seed, "gp_resolution": gp_resolution, "swd": {}, "swd_real_vs_real": {}, "gp": {}, "seconds": {}}
    for r in RES:
        t0 = time.time()
        progan(root, "train", "--res", str(r), env=env)
        out["seconds"][r] = time.time() - t0
        progan(root, "evaluate", "--res", str(r), env=env)
        ev = json.loads((root / "results" / str(r) / "eval.json").read_text())
        out["swd"][r] = ev["swd"]
        out["swd_real_vs_real"][r] = ev["swd_real_vs_real"]["swd_avg"]
        rows = (root / "results" / str(r) / "losses.tsv").read_text().splitlines()
        head = rows[0].split("\t")
        last = dict(zip(head, rows[-1].split("\t")))
        out["gp"][r] = {k: float(last[k]) for k in ("gp", "d_loss", "g_loss", "d_real", "d_fake")}
        print(f"  {gp_resolution:7s} seed {seed} {r:2d} px: SWD avg {ev['swd']['swd_avg']:.2f} "
              f"(real vs real {ev['swd_real_vs_real']['swd_avg']:.2f}), last tick gp {out['gp'][r]['gp']:.3f} "
              f"d_loss {out['gp'][r]['d_loss']:.3f}, train {out['seconds'][r]:.0f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kimg", type=float, default=4.0, help="kimg per phase (fade-in and stabilise)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--nets", choices=sorted(NETS), default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.time()
    data_dir = prepare_data(env, args.kimg)
    runs = []
    for seed in args.seeds:
        for gp_resolution in ("dataset", "native"):            # interleaved: both see the same machine load
            runs.append(run_one(seed, gp_resolution, args.kimg, args.nets, data_dir, env))
    summary = {}
    for v in ("dataset", "native"):
        summary[v] = {r: statistics.mean(run["swd"][r]["swd_avg"] for run in runs if run["gp_resolution"] == v)
                      for r in RES}
    print(f"\nSWD x1e3 (avg over levels), mean of seeds {args.seeds}, {args.nets} nets, {args.kimg:g} kimg per phase:")
    print("stage  " + "  ".join(f"{v:>9s}" for v in summary) + "  real-vs-real")
    for r in RES:
        floor = statistics.mean(run["swd_real_vs_real"][r] for run in runs)
        print(f"{r:3d} px " + "  ".join(f"{summary[v][r]:9.2f}" for v in summary) + f"  {floor:11.2f}")
    result = {"kimg_per_phase": args.kimg, "seeds": args.seeds, "nets": args.nets, "threads": args.threads,
              "images": 2010,
              "runs": runs, "mean_swd_avg": summary, "seconds": time.time() - t0}
    (OUT / "results.json").write_text(json.dumps(result, indent=2))
    print(f"({time.time() - t0:.0f} s) -> {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
