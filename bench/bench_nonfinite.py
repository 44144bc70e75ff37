"""What the non-finite step skip costs (issue #13): train/loop.py `train_step` as it runs now (fused Adam, the
gradient check and the on-device skip of train/nonfinite.py `step_if_finite`) against the step before it (foreach
Adam, a plain `opt.step()`, no check), on the same nets, inputs and machine, interleaved so both see the same load.

    .venv/bin/python bench/bench_nonfinite.py [--steps 20] [--repeats 5] [--threads 2]

Tiny nets (latent 16, fmap 64/16) at 8 and 32 px and the paper's nets at 4 px, batch 16; CUDA when present.
Writes bench/out/bench_nonfinite.json. Median ms per step of each variant and their ratio.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

import bench_train  # noqa: E402
from progan import params as params_mod  # noqa: E402
from progan.model.networks import Discriminator, Generator, ModelConfig  # noqa: E402
from progan.train import nets as nets_mod, step as step_mod  # noqa: E402

OUT = REPO / "bench" / "out"
CASES = [("tiny", 8), ("tiny", 32), ("paper", 4)]


def _plain_step(opt):
    """The step before issue #13: opt.step() whatever the gradients hold."""
    opt.step()
    return torch.zeros(())


def _variant(name, params, res, device):
    cfg = ModelConfig.from_params(params)
    torch.manual_seed(0)
    G, D = Generator(cfg, res).to(device), Discriminator(cfg, res).to(device)
    nets = nets_mod.Nets(G, D, copy.deepcopy(G).requires_grad_(False), cfg, None, None, [])
    if name == "skip":
        adam = nets_mod.Adam.from_params(params, res)
        opt_G, opt_D = adam.make(G), adam.make(D)
    else:
        kw = dict(lr=0.001, betas=(0.0, 0.99), eps=1e-8)
        opt_G, opt_D = torch.optim.Adam(G.parameters(), **kw), torch.optim.Adam(D.parameters(), **kw)
    return nets, opt_G, opt_D


def _time(name, state, inputs, alpha, tp, steps, device):
    nets, opt_G, opt_D = state
    real = step_mod.step_if_finite
    step_mod.step_if_finite = real if name == "skip" else _plain_step
    settings = step_mod.Settings(tp.loss, tp.gp_weight, tp.drift_weight, tp.ema_decay)
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        acc = None
        for _ in range(steps):
            s = step_mod.train_step(nets, opt_G, opt_D, step_mod.StepInputs(*inputs, alpha), settings, 1)
            acc = s if acc is None else acc + s
        acc.tolist()                                             # the per-tick sync
        return 1000 * (time.perf_counter() - t0) / steps
    finally:
        step_mod.step_if_finite = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per repeat (paper nets: a quarter)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for kind, res in CASES:
        root = bench_train.make_root(OUT / f"nonfinite_{kind}", max(res, 8), 64, bench_train.CONFIGS[kind], 16)
        params = params_mod.load(root)
        torch.manual_seed(1)                                      # synthetic inputs: the step is what is timed
        inputs = (torch.rand(16, 3, res, res, device=device) * 2 - 1, torch.randn(16, params.model.latent_dim,
                  device=device), torch.randn(16, params.model.latent_dim, device=device), torch.rand(16, device=device))
        alpha = 0.5 if res > 4 else 1.0
        steps = max(2, args.steps // (4 if kind == "paper" else 1))
        states = {n: _variant(n, params, res, device) for n in ("plain", "skip")}
        for n in states:                                          # warm-up, not timed
            _time(n, states[n], inputs, alpha, params.train, 2, device)
        ms = {n: [] for n in states}
        for _ in range(args.repeats):
            for n in ("plain", "skip"):
                ms[n].append(_time(n, states[n], inputs, alpha, params.train, steps, device))
        med = {n: statistics.median(v) for n, v in ms.items()}
        r = {"nets": kind, "res_px": res, "batch": 16, "device": device.type, "steps": steps, "repeats": args.repeats,
             "plain_ms": med["plain"], "skip_ms": med["skip"], "ratio": med["skip"] / med["plain"], "all_ms": ms}
        print(f"{kind:5s} {res:3d} px: before {med['plain']:.2f} ms/step, with the skip {med['skip']:.2f} ms/step "
              f"({100 * (r['ratio'] - 1):+.1f}%)", flush=True)
        results.append(r)
        if kind == "paper":
            results.append(_optimizer_only(states, args.repeats, device))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_nonfinite.json").write_text(json.dumps(results, indent=2))


def _optimizer_only(states, repeats, device, steps=20):
    """The part that changed, alone: the D and G optimizer steps of the paper nets (23 M parameters) with their
    gradients in place: foreach Adam `step()` against the finiteness check + fused Adam with found_inf."""
    out = {}
    for n, (nets, opt_G, opt_D) in states.items():
        for net in (nets.G, nets.D):
            for prm in net.parameters():
                prm.grad = torch.randn_like(prm) * 1e-3
    ms = {n: [] for n in states}
    for _ in range(repeats):
        for n, (nets, opt_G, opt_D) in states.items():
            step = loop.step_if_finite if n == "skip" else _plain_step
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(opt_D), step(opt_G)
            if device.type == "cuda":
                torch.cuda.synchronize()
            ms[n].append(1000 * (time.perf_counter() - t0) / steps)
    grads = [p.grad for net in (states["skip"][0].G, states["skip"][0].D) for p in net.parameters()]
    ms["check"] = []
    for _ in range(repeats):                                      # the finiteness check by itself
        t0 = time.perf_counter()
        for _ in range(steps):
            found = torch.zeros((), device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones((), device=device))
        found.item()
        ms["check"].append(1000 * (time.perf_counter() - t0) / steps)
    out = {n: statistics.median(v) for n, v in ms.items()}
    n_params = sum(p.numel() for net in (states["skip"][0].G, states["skip"][0].D) for p in net.parameters())
    print(f"paper nets, optimizer steps alone ({n_params / 1e6:.1f} M parameters): before {out['plain']:.2f} ms, "
          f"with the check and skip {out['skip']:.2f} ms ({100 * (out['skip'] / out['plain'] - 1):+.1f}%; the check "
          f"alone {out['check']:.2f} ms)", flush=True)
    return {"nets": "paper", "part": "optimizer steps (D and G)", "parameters": n_params, "plain_ms": out["plain"],
            "skip_ms": out["skip"], "check_ms": out["check"], "ratio": out["skip"] / out["plain"], "all_ms": ms}


if __name__ == "__main__":
    main()
