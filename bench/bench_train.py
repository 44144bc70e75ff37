"""Training step throughput (img/s, FLOP/s) before and after issue #17, side by side in one run.

Two configs: the tests' tiny nets (latent 16, fmap_base 64, fmap_max 16) and the paper's 512-channel nets
(latent 512, fmap_base 8192, fmap_max 512), batch 16, fading in above 4 px. Variants, timed interleaved:
    old  the step before issue #17 (tests/reference_step.py: D on reals, fakes and mixed images in three passes,
         the fused convs' kernels built by pad + four slices + sums, as main built them)
    new  train/step.py's train_step (reals and fakes in one critic pass, one-GEMM fused kernels)
    new, pad-sum kernels  (--kernel-ab) the new step with the old kernel build: what each change brings
Each round times `--steps` steps back to back of every variant (order rotating per round), `--reps` rounds; the
table gives the median img/s and the median of the per-round new/old ratios, so the shared machine's load falls
on both alike. Every variant trains its own copy of the same seeded nets on the same real minibatches (a pyramid
built from ../shared/data/celeba-aligned-2k in bench/out/, drawn as train/loop.py draws them).
FLOPs per training image: one step counted with torch.utils.flop_counter.FlopCounterMode (matmuls and convs,
forward and backward, the penalty's double backward; elementwise ops not counted, as usual); achieved FLOP/s =
FLOPs x img/s, against this device's measured peak (a large fp32 matmul, before and after the runs; fp32 and
bf16 on CUDA).

    .venv/bin/python bench/bench_train.py [--threads N] [--steps 4] [--reps 5] [--tiny-res 4 8 16 32]
                                          [--paper-res 4 8 16] [--paper-steps 2] [--kernel-ab]
                                          [--channels-last] [--amp]
On a GPU, for the >= 64 px figures: --paper-res 4 8 16 32 64 128 --paper-steps 20 --amp.
Writes bench/out/bench_train.json (with the load average before and after). Figures vary with the load.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))           # reference_step: the old step

from progan import params as params_mod, paths  # noqa: E402
from progan.model.networks import Discriminator, Generator, ModelConfig  # noqa: E402
from progan.train import data, nets as nets_mod, step as step_mod  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import reference_step  # noqa: E402

CELEBA = REPO.parent / "shared" / "data" / "celeba-aligned-2k"
OUT = REPO / "bench" / "out"
CONFIGS = {"tiny": dict(latent_dim=16, fmap_base=64, fmap_max=16),
           "paper": dict(latent_dim=512, fmap_base=8192, fmap_max=512)}


def make_root(root: Path, top_px: int, n_images: int, model: dict, batch: int) -> Path:
    """params.yaml + data/pyramid/<r>.npy for r = 4..top_px from real CelebA images (center square, PIL box)."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["crop"]["size"] = top_px
    p["model"].update(model)
    p["train"]["stages"] = {str(r): {"batch": batch, "lr": 0.001, "transition_kimg": 0 if r == 4 else 1,
                                     "stabilize_kimg": 1} for r in [2**k for k in range(2, top_px.bit_length())]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    files = sorted(CELEBA.glob("*.jpg"))[:n_images]
    for r in [2**k for k in range(2, top_px.bit_length())]:
        out = root / paths.pyramid_level(r)
        if out.is_file() and np.load(out, mmap_mode="r").shape[0] == len(files):
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        arr = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(len(files), r, r, 3))
        for i, f in enumerate(files):
            im = Image.open(f).convert("RGB")
            w, h = im.size
            t = (h - w) // 2
            arr[i] = np.asarray(im.crop((0, t, w, t + w)).resize((r, r), Image.BOX))
        arr.flush()
        del arr
    return root / "params.yaml"


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 5) -> float:
    """FLOP/s of a large square matmul: the practical peak this device reaches (2 n^3 FLOPs per product; n 4096 on
    CUDA, 2048 on the CPU: ~1.5 s there, so it can be taken again before every resolution)."""
    n = n or (4096 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


class _GlobalOnly:
    """Stands in for FlopCounterMode's ModuleTracker: its module hooks make torch.autograd.grad (the penalty's
    create_graph=True backward) fail with "A leaf node was passed to _will_engine_execute_node" (torch 2.14).
    Only the global total is used here."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


VARIANTS = ("old", "new")     # tests/reference_step.py's step (main before issue #17) and train/step.py's
KERNEL_AB = "new, pad-sum kernels"   # --kernel-ab: the new step with main's fused-conv kernel build (attribution)


def step_fn(variant: str):
    """The train_step of one variant (same signature as step.train_step)."""
    if variant == "old":
        return reference_step.train_step
    if variant == KERNEL_AB:
        def padsum_step(*args):
            with reference_step.main_fused_kernels():
                return step_mod.train_step(*args)
        return padsum_step
    return step_mod.train_step


def make_inputs(params, res: int, steps: int, device, channels_last: bool) -> list:
    """`steps` StepInputs of consecutive minibatches, drawn as train/loop.py draws them (sampler, memmap gather,
    step_inputs) from the real pyramid: every variant trains on the same ones."""
    batch, cfg = int(params.stage(res).batch), ModelConfig.from_params(params)
    images = data.open_level(res)
    sampler = data.Sampler(len(images), params.seed, res, True)
    alpha = 0.5 if res > 4 else 1.0                                      # fading in (the costlier case above 4 px)
    out = []
    for i in range(steps):
        idx, flip = sampler.indices(i * batch, batch)
        x_u8 = torch.from_numpy(data.read_batch(images, idx))
        out.append(step_mod.step_inputs(params.seed, res, batch, i * batch, x_u8, torch.from_numpy(flip), alpha,
                                        cfg.latent_dim, device, channels_last))
    return out


def make_state(params, res: int, device, channels_last: bool):
    """Seeded G, D, G_ema (the same weights for every variant), fresh fused Adam for each net."""
    cfg = ModelConfig.from_params(params)
    torch.manual_seed(0)
    G, D = Generator(cfg, res).to(device), Discriminator(cfg, res).to(device)
    if channels_last:                                     # as train/loop.py does with train.channels_last
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    G_ema = copy.deepcopy(G).requires_grad_(False)
    adam = nets_mod.Adam.from_params(params, res)
    nets = nets_mod.Nets(G=G, D=D, G_ema=G_ema, cfg=cfg, prev=None, prev_sha256=None, grown_keys=[])
    return nets, adam.make(G), adam.make(D)


def count_flops(fn, state, inputs, settings) -> float:
    """FLOPs of one training step (torch.utils.flop_counter: matmuls and convolutions, forward and backward,
    the penalty's double backward included; elementwise ops are not counted, as usual)."""
    fc = FlopCounterMode(display=False)
    fc.mod_tracker = _GlobalOnly()
    with fc:
        fn(*state, inputs, settings, 1)
    return float(fc.get_total_flops())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_res(params, res: int, steps: int, reps: int, device: torch.device, variants, channels_last: bool = False,
              amp: bool = False) -> dict:
    """img/s of each variant's train_step at `res`: `reps` rounds, each timing `steps` steps back to back of every
    variant in turn (the order rotating each round), so the machine's load falls on all of them alike. Each variant
    trains its own copy of the same seeded nets on the same minibatches; one warm-up step each, not timed."""
    tp, batch = params.train, int(params.stage(res).batch)
    settings = step_mod.Settings(tp.loss, tp.gp_weight, tp.drift_weight, tp.ema_decay)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp and device.type == "cuda" \
        else contextlib.nullcontext
    inputs = make_inputs(params, res, steps + 1, device, channels_last)
    states = {v: make_state(params, res, device, channels_last) for v in variants}
    fns = {v: step_fn(v) for v in variants}
    flops = {v: count_flops(fns[v], make_state(params, res, device, channels_last), inputs[0], settings) / batch
             for v in variants}
    for v in variants:                                                   # warm-up
        fns[v](*states[v], inputs[0], settings, 1, autocast).tolist()
    times = {v: [] for v in variants}
    for rep in range(reps):
        order = variants[rep % len(variants):] + variants[:rep % len(variants)]
        for v in order:
            sync(device)
            t0 = time.perf_counter()
            stats = [fns[v](*states[v], x, settings, 1, autocast) for x in inputs[1:]]
            torch.stack(stats).tolist()                                  # the per-tick sync
            times[v].append(time.perf_counter() - t0)
    img_s = {v: [steps * batch / t for t in times[v]] for v in variants}
    ratio = {v: float(np.median([a / b for a, b in zip(img_s[v], img_s["old"])])) for v in variants}
    G, D = states[variants[0]][0].G, states[variants[0]][0].D
    return {"res_px": res, "batch": batch, "steps": steps, "reps": reps, "amp": amp,
            "img_s": {v: float(np.median(img_s[v])) for v in variants}, "img_s_all": img_s,
            "speedup_vs_old": ratio, "flops_per_img": flops,
            "achieved_flop_s": {v: flops[v] * float(np.median(img_s[v])) for v in variants},
            "G_params": sum(p.numel() for p in G.parameters()), "D_params": sum(p.numel() for p in D.parameters())}


def row(r: dict, variants, peak_flop_s: float) -> str:
    """One markdown table row: img/s and GFLOP/s (% of peak) per variant, then each variant's speed-up over old
    (median of the per-round ratios, with their range)."""
    cells = "".join(f" | {r['img_s'][v]:.1f} | {r['achieved_flop_s'][v] / 1e9:.1f} "
                    f"({100 * r['achieved_flop_s'][v] / peak_flop_s:.0f}%)" for v in variants)
    ratios = []
    for v in variants[1:]:
        per_round = [a / b for a, b in zip(r["img_s_all"][v], r["img_s_all"]["old"])]
        ratios.append(f"{r['speedup_vs_old'][v]:.2f}x ({min(per_round):.2f}-{max(per_round):.2f})")
    return f"| {r['config']} | {r['res_px']} | {r['batch']}{cells} | " + " | ".join(ratios) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="steps per variant per round, tiny nets")
    ap.add_argument("--paper-steps", type=int, default=2, help="steps per variant per round, paper nets")
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds per resolution")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tiny-res", type=int, nargs="*", default=[32])
    ap.add_argument("--paper-res", type=int, nargs="*", default=[4, 8, 16])
    ap.add_argument("--kernel-ab", action="store_true", help=f"also time '{KERNEL_AB}' (what the kernel build brings)")
    ap.add_argument("--channels-last", action="store_true", help="nets and reals in channels_last (train.channels_last)")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast, as train.amp (CUDA only)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if device.type == "cuda" else [])
    peaks = {name: [matmul_peak_flops(device, dt)] for name, dt in dtypes}      # again before each resolution
    peak_before = {name: v[0] for name, v in peaks.items()}
    peak_name = "bf16" if device.type == "cuda" and args.amp else "fp32"
    variants = VARIANTS + ((KERNEL_AB,) if args.kernel_ab else ())
    print(f"load average {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f} (1/5/15 min), "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; measured matmul "
          "peak: " + ", ".join(f"{n} {v / 1e9:.1f} GFLOP/s" for n, v in peak_before.items()), flush=True)
    print("(% of peak below: of the best matmul peak measured during the run; the final table repeats the rows)")
    head = "".join(f" | {v} img/s | GFLOP/s (% peak)" for v in variants)
    print(f"| nets | px | batch{head} | " + " | ".join(f"{v} / old" for v in variants[1:]) + " |", flush=True)
    results = []
    cwd = os.getcwd()
    for name, res_list, steps in (("tiny", args.tiny_res, args.steps), ("paper", args.paper_res, args.paper_steps)):
        if not res_list:
            continue
        params_path = make_root(OUT / f"train_{name}", max(max(res_list), 8), 64, CONFIGS[name], args.batch)
        os.chdir(params_path.parent)
        try:
            params = params_mod.load(params_path)
            for res in res_list:
                for n, dt in dtypes:
                    peaks[n].append(matmul_peak_flops(device, dt))
                r = {"config": name, **bench_res(params, res, steps, args.reps, device, variants,
                                                 args.channels_last, args.amp)}
                results.append(r)
                print(row(r, variants, max(peaks[peak_name])), flush=True)
        finally:
            os.chdir(cwd)
    peak_after = {name: matmul_peak_flops(device, dt) for name, dt in dtypes}
    for n in peaks:
        peaks[n].append(peak_after[n])
    peak = {n: max(v) for n, v in peaks.items()}      # the best the device reached: the least disturbed by the load
    print(f"\nagainst the best matmul peak measured ({peak_name} {peak[peak_name] / 1e9:.1f} GFLOP/s of "
          + ", ".join(f"{v / 1e9:.1f}" for v in peaks[peak_name]) + "):", flush=True)
    print(f"| nets | px | batch{head} | " + " | ".join(f"{v} / old" for v in variants[1:]) + " |")
    print("|---" * (3 + 2 * len(variants) + len(variants) - 1) + "|")
    for r in results:
        print(row(r, variants, peak[peak_name]))
    meta = {"device": str(device), "channels_last": args.channels_last, "amp": args.amp and device.type == "cuda",
            "variants": list(variants), "matmul_peak_flop_s": peak, "matmul_peak_flop_s_all": peaks, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
            "note": "shared machine: figures vary with load; variants interleaved"}
    print(f"FLOPs per image: " + "; ".join(f"{r['config']} {r['res_px']} px "
                                           f"{r['flops_per_img']['new'] / 1e9:.3f} GFLOP" for r in results))
    print(f"load average after {meta['load_avg_after'][0]:.2f} / {meta['load_avg_after'][1]:.2f} / "
          f"{meta['load_avg_after'][2]:.2f}; matmul peak after: "
          + ", ".join(f"{n} {v / 1e9:.1f} GFLOP/s" for n, v in peak_after.items()), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / ("bench_train" + ("_channels_last" if args.channels_last else "") + ("_amp" if args.amp else "")
                 + ".json")
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
