"""Training throughput (img/s) per resolution, with a per-step breakdown, on this machine's CPU (or CUDA).

Two configs: the tests' tiny nets (latent 16, fmap_base 64, fmap_max 16) and the paper's 512-channel nets
(latent 512, fmap_base 8192, fmap_max 512), at small resolutions, a few minibatches each. The step is the
one of train/step.py (`train_step`), re-timed part by part with the same calls:
    data  sampler + memmap gather + uint8 -> float on the device + fade_reals
    G_fwd  G forward for the D step (no graph)
    D_fwd  D on reals and fakes (d_loss without penalty);  D_bwd  its backward
    GP     gradient penalty forward + its double backward
    opt_D / opt_G  Adam steps;  G_step  G forward + D forward + backward for the G loss;  EMA  G_ema lerp
    other  the rest of the wall time of a step (Python, allocator, loop bookkeeping)
FLOPs of one training image, counted with torch.utils.flop_counter.FlopCounterMode on one minibatch (matmul and
conv ops, forward and backward; elementwise ops are not counted, as usual): G forward, D forward+backward on reals
and fakes, the penalty's forward + double backward, and the G step. Achieved FLOP/s = counted FLOPs x the loop's
img/s (`bench_loop`: train/loop.py's own path, steps back to back, no per-part syncs), against this device's
measured peak (a large fp32 matmul on the CPU; fp32 and bf16 matmuls on CUDA).
Real data: a pyramid built from CelebA images (../shared/data/celeba-aligned-2k) in bench/out/.

    .venv/bin/python bench/bench_train.py [--steps 4] [--threads N] [--paper-res 4 8] [--tiny-res 4 8 16 32]
                                          [--channels-last] [--amp]
On a GPU, for the issue's >= 64 px figures: --paper-res 4 8 16 32 64 128 --paper-steps 20 --amp.
Writes bench/out/bench_train.json. The machine may be shared: figures vary with the load.
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

from progan import params as params_mod, paths  # noqa: E402
from progan.model.networks import Discriminator, Generator, ModelConfig  # noqa: E402
from progan.train import data, nets as nets_mod, step as step_mod  # noqa: E402
from progan.train.loss import d_loss, g_loss, gradient_penalty  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

CELEBA = REPO.parent / "shared" / "data" / "celeba-aligned-2k"
OUT = REPO / "bench" / "out"
CONFIGS = {"tiny": dict(latent_dim=16, fmap_base=64, fmap_max=16),
           "paper": dict(latent_dim=512, fmap_base=8192, fmap_max=512)}
PARTS = ["data", "G_fwd", "D_fwd", "D_bwd", "GP", "opt_D", "G_step", "opt_G", "EMA"]


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


class Timer:
    def __init__(self, device):
        self.device, self.t = device, {k: 0.0 for k in PARTS}

    @contextlib.contextmanager
    def __call__(self, name):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.t[name] += time.perf_counter() - t0


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 4096, reps: int = 5) -> float:
    """FLOP/s of a large square matmul: the practical peak this device reaches (2 n^3 FLOPs per product)."""
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


def count_flops(params, res: int, device: torch.device) -> dict:
    """FLOPs per training image, by part, counted on one minibatch of the training step's own calls."""
    tp, batch = params.train, int(params.stage(res).batch)
    cfg = ModelConfig.from_params(params)
    torch.manual_seed(0)
    G, D = Generator(cfg, res).to(device), Discriminator(cfg, res).to(device)
    alpha = 0.5 if res > 4 else 1.0
    reals = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    z = torch.randn(batch, cfg.latent_dim, device=device)
    counts = {}

    def count(name, fn):
        fc = FlopCounterMode(display=False)
        fc.mod_tracker = _GlobalOnly()
        with fc:
            out = fn()
        counts[name] = fc.get_total_flops() / batch
        return out

    with torch.no_grad():
        fakes = count("G_fwd", lambda: G(z, alpha))
    count("D_fwd_bwd", lambda: d_loss(D, reals, fakes, alpha, tp.loss, 0.0, tp.drift_weight)[0].backward())
    count("GP_fwd_double_bwd", lambda: (tp.gp_weight * gradient_penalty(D, reals, fakes, alpha)).backward())
    D.requires_grad_(False)
    count("G_step", lambda: g_loss(D, G(z, alpha), alpha, tp.loss).backward())
    counts["total"] = sum(counts.values())
    return counts


def bench_loop(params, res, steps, device, channels_last, amp, G, D, G_ema, opt_G, opt_D, images, sampler) -> float:
    """img/s of the training loop's own path, as train/loop.py runs it: Batches (prefetch thread, pinned on CUDA),
    `step.step_inputs`, `step.train_step` (bf16 autocast with --amp on CUDA), steps back to back with one device
    sync at the end: no per-part syncs, so on CUDA the host runs ahead of the GPU."""
    batch, cfg = int(params.stage(res).batch), ModelConfig.from_params(params)
    nets = nets_mod.Nets(G=G, D=D, G_ema=G_ema, cfg=cfg, prev=None, prev_sha256=None, grown_keys=[])
    tp = params.train
    settings = step_mod.Settings(tp.loss, tp.gp_weight, tp.drift_weight, tp.ema_decay)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp and device.type == "cuda" \
        else contextlib.nullcontext
    alpha = 0.5 if res > 4 else 1.0
    cuda = device.type == "cuda"
    stats = torch.zeros(len(step_mod.STEP_STATS), device=device)
    batches = data.Batches(images, sampler, batch, 0, (steps + 1) * batch, prefetch=2, pin_memory=cuda)
    for i, (nimg, x_u8, flip) in enumerate(batches):
        if i == 1:                                                       # batch 0 = warm-up, not timed
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        inputs = step_mod.step_inputs(params.seed, res, batch, nimg, x_u8, flip, alpha, cfg.latent_dim, device,
                                  channels_last)
        stats += step_mod.train_step(nets, opt_G, opt_D, inputs, settings, 1, autocast)
    stats.tolist()                                                       # the per-tick sync
    return steps * batch / (time.perf_counter() - t0)


def bench_res(params, res: int, steps: int, device: torch.device, channels_last: bool = False,
              amp: bool = False) -> dict:
    tp, batch = params.train, int(params.stage(res).batch)
    cfg = ModelConfig.from_params(params)
    torch.manual_seed(0)
    G, D = Generator(cfg, res).to(device), Discriminator(cfg, res).to(device)
    if channels_last:                                     # as train/loop.py does with train.channels_last
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    G_ema = copy.deepcopy(G).requires_grad_(False)
    adam = nets_mod.Adam.from_params(params, res)
    opt_G, opt_D = adam.make(G), adam.make(D)
    images = data.open_level(res)
    sampler = data.Sampler(len(images), params.seed, res, True)
    alpha = 0.5 if res > 4 else 1.0
    timer = Timer(device)
    for step in range(steps + 1):                                        # step 0 = warm-up, not timed
        if step == 1:
            timer.t = {k: 0.0 for k in PARTS}
            wall0 = time.perf_counter()
        nimg = step * batch
        with timer("data"):
            idx, flip = sampler.indices(nimg, batch)
            x_u8 = torch.from_numpy(data.read_batch(images, idx))
            reals, z_d, z_g, mix, _ = step_mod.step_inputs(params.seed, res, batch, nimg, x_u8, torch.from_numpy(flip),
                                                       alpha, cfg.latent_dim, device, channels_last)
        D.requires_grad_(True)
        with timer("G_fwd"), torch.no_grad():
            fakes = G(z_d, alpha)
        with timer("D_fwd"):
            loss, _ = d_loss(D, reals, fakes, alpha, tp.loss, 0.0, tp.drift_weight)
        opt_D.zero_grad(set_to_none=True)
        with timer("D_bwd"):
            loss.backward()
        with timer("GP"):
            (tp.gp_weight * gradient_penalty(D, reals, fakes, alpha, mix=mix)).backward()
        with timer("opt_D"):
            opt_D.step()
        D.requires_grad_(False)
        with timer("G_step"):
            lg = g_loss(D, G(z_g, alpha), alpha, tp.loss)
            opt_G.zero_grad(set_to_none=True)
            lg.backward()
        with timer("opt_G"):
            opt_G.step()
        with timer("EMA"):
            step_mod.ema_update(G_ema, G, tp.ema_decay)
    wall = time.perf_counter() - wall0
    per_step_ms = {k: 1000 * v / steps for k, v in timer.t.items()}
    per_step_ms["other"] = max(0.0, 1000 * wall / steps - sum(per_step_ms.values()))
    flops = count_flops(params, res, device)
    img_s = steps * batch / wall
    loop_img_s = bench_loop(params, res, steps, device, channels_last, amp, G, D, G_ema, opt_G, opt_D, images, sampler)
    return {"res_px": res, "batch": batch, "steps": steps, "img_s": img_s, "loop_img_s": loop_img_s, "amp": amp,
            "step_ms": 1000 * wall / steps, "parts_ms": per_step_ms,
            "flops_per_img": flops, "achieved_flop_s": flops["total"] * loop_img_s,
            "G_params": sum(p.numel() for p in G.parameters()), "D_params": sum(p.numel() for p in D.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="timed minibatches per resolution (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tiny-res", type=int, nargs="*", default=[4, 8, 16, 32])
    ap.add_argument("--paper-res", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--paper-steps", type=int, default=2)
    ap.add_argument("--channels-last", action="store_true", help="nets and reals in channels_last (train.channels_last)")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast in the loop timing, as train.amp (CUDA only)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if device.type == "cuda" else [])
    peak = [(name, matmul_peak_flops(device, dt)) for name, dt in dtypes]
    if device.type == "cuda":
        peak.sort(key=lambda p: p[0] != "bf16")       # the target is against the bf16 matmul peak
    print("measured matmul peak: " + ", ".join(f"{n} {v / 1e9:.1f} GFLOP/s" for n, v in peak), flush=True)
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
                r = {"config": name, **bench_res(params, res, steps, device, args.channels_last, args.amp)}
                results.append(r)
                parts = " ".join(f"{k} {v:.1f}" for k, v in r["parts_ms"].items())
                nets = 100 * (1 - (r["parts_ms"]["data"] + r["parts_ms"]["other"]) / r["step_ms"])
                print(f"{name:5s} {res:3d}px batch {r['batch']}: {r['loop_img_s']:8.1f} img/s in the loop;"
                      f" timed part by part {r['img_s']:.1f} img/s, {r['step_ms']:.1f} ms/step"
                      f"  [{parts}] ms  networks {nets:.0f}%", flush=True)
                f = r["flops_per_img"]
                print(f"      FLOPs/img: G_fwd {f['G_fwd'] / 1e6:.2f}M  D_fwd_bwd {f['D_fwd_bwd'] / 1e6:.2f}M  "
                      f"GP {f['GP_fwd_double_bwd'] / 1e6:.2f}M  G_step {f['G_step'] / 1e6:.2f}M  "
                      f"total {f['total'] / 1e9:.3f} GFLOP;  achieved {r['achieved_flop_s'] / 1e9:.2f} GFLOP/s "
                      f"= {100 * r['achieved_flop_s'] / peak[0][1]:.1f}% of {peak[0][0]} peak", flush=True)
        finally:
            os.chdir(cwd)
    meta = {"device": str(device), "channels_last": args.channels_last, "amp": args.amp and device.type == "cuda",
            "matmul_peak_flop_s": dict(peak),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "note": "shared machine: figures vary with load"}
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / ("bench_train" + ("_channels_last" if args.channels_last else "") + ("_amp" if args.amp else "")
                 + ".json")
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
