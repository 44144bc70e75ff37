"""Does `torch.compile` speed up the training step (train/step.py `train_step`) on this machine? (issue #6)

Variants, all on the same precomputed minibatches (real CelebA pyramid from bench_train.make_root; data time is
NOT included: img/s is of the step alone):
    eager       step.train_step itself (today's step: D loss, autograd.grad(create_graph=True) penalty, G loss, EMA)
    compiled    torch.compile(G) and torch.compile(D) for G's forwards, D on reals/fakes and the G loss; the
                penalty stays eager on the uncompiled D (same weights): aot_autograd cannot trace the double
                backward of autograd.grad(create_graph=True)
    func_eager  eager step whose penalty is written with torch.func: grad of x -> functional_call(D, params, x).sum()
                over the whole batch x_hat (D's minibatch stddev couples samples, so no per-sample vmap: this is
                exactly the gradient autograd.grad(scores.sum(), x_hat) computes). Checks that rewrite alone.
    func_compiled  the whole D loss (reals, fakes, drift and the torch.func penalty) in one torch.compile'd
                function; G forwards and the G loss through torch.compile(G) / torch.compile(D) as in `compiled`
Adam steps and the EMA update are eager in every variant.

Per variant: 3 steps from the same seeded init on the same minibatches as eager -> max |difference| of every
D and G parameter and of the step's stats [d_loss, g_loss, gp, d_real, d_fake] against eager; then
`--steps` timed steps. With Adam's beta1 = 0 the first update is ~lr * sign(grad), so rounding-level gradient
differences on ~0 gradients grow to ~lr per step: the first step's stats (before any update) are the tighter check.
compile_s = first step's time - a steady step's time (the first step compiles every graph).

    .venv/bin/python bench/bench_compile.py [--steps 10] [--paper-steps 3] [--tiny-res 8 32] [--paper-res 4 8]
Writes bench/out/bench_compile.json. The machine may be shared: figures vary with the load.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402  (puts src/ on sys.path)

from progan import params as params_mod  # noqa: E402
from progan.model.networks import Discriminator, Generator, ModelConfig, fade_reals  # noqa: E402
from progan.train import data, nets as nets_mod, step as step_mod  # noqa: E402
from progan.train.loss import WGAN_TARGET, _fp32, d_loss, g_loss, gradient_penalty  # noqa: E402

OUT = bench_train.OUT
CHECK_STEPS = 3
# Tolerance for "matches eager" after 3 steps: fp32, inductor reorders reductions, and Adam with beta1 = 0 makes
# the first updates ~lr * sign(grad), so a parameter whose gradient is ~0 can move by up to 2 * lr differently.
TOL_PARAM = 1e-4          # max |param difference| (lr is 1e-3 here)
TOL_STATS_REL = 1e-4      # max |stat difference| / max(1, |stat|)


def make_batches(params, res: int, n: int, device) -> list[tuple]:
    """n minibatches (reals, z_d, z_g, mix) exactly as bench_train.bench_res / the training loop draws them."""
    batch, cfg = int(params.stage(res).batch), ModelConfig.from_params(params)
    images = data.open_level(res)
    sampler = data.Sampler(len(images), params.seed, res, True)
    alpha = 0.5 if res > 4 else 1.0
    out = []
    for step in range(n):
        nimg = step * batch
        idx, flip = sampler.indices(nimg, batch)
        reals = data.to_device(torch.from_numpy(data.read_batch(images, idx)), torch.from_numpy(flip), device, False)
        reals = fade_reals(reals, alpha) if res > 4 else reals
        out.append((reals, step_mod.latents(params.seed, res, nimg, 2, batch, cfg.latent_dim).to(device),
                    step_mod.latents(params.seed, res, nimg, 3, batch, cfg.latent_dim).to(device),
                    step_mod.gp_mix(params.seed, res, nimg, batch).to(device)))
    return out


def build(params, res: int, device):
    cfg = ModelConfig.from_params(params)
    torch.manual_seed(0)
    G, D = Generator(cfg, res).to(device), Discriminator(cfg, res).to(device)
    nets = nets_mod.Nets(G, D, copy.deepcopy(G).eval().requires_grad_(False), cfg, None, None, [])
    adam = nets_mod.Adam.from_params(params, res)
    return nets, adam.make(G), adam.make(D)


def func_penalty(D, reals, fakes, alpha, mix):
    """loss.gradient_penalty with torch.func instead of autograd.grad(create_graph=True): grad of the summed
    scores w.r.t. the whole batch x_hat (minibatch stddev couples the samples: no per-sample vmap)."""
    n = reals.shape[0]
    mix = mix.reshape(n, 1, 1, 1).to(device=reals.device, dtype=reals.dtype)
    x_hat = torch.lerp(reals.detach(), fakes.detach().to(reals.dtype), mix)
    params = dict(D.named_parameters())
    buffers = dict(D.named_buffers())

    def total(x):
        return _fp32(torch.func.functional_call(D, (params, buffers), (x, alpha))).sum()

    grad = torch.func.grad(total)(x_hat)
    norms = _fp32(grad).square().sum(dim=tuple(range(1, grad.ndim))).sqrt()
    return (norms - WGAN_TARGET).square().mean()


def make_step(variant: str, nets, opt_G, opt_D, alpha, tp):
    """A function (reals, z_d, z_g, mix) -> stats, for `variant`; mirrors step.train_step line by line."""
    if variant == "eager":
        settings = step_mod.Settings(tp.loss, tp.gp_weight, tp.drift_weight, tp.ema_decay)
        return lambda reals, z_d, z_g, mix: step_mod.train_step(
            nets, opt_G, opt_D, step_mod.StepInputs(reals, z_d, z_g, mix, alpha), settings,
            1)[:len(step_mod.STAT_KEYS)]                                        # without the skip flags
    G, D = nets.G, nets.D
    Gc, Dc = (torch.compile(G), torch.compile(D)) if variant in ("compiled", "func_compiled") else (G, D)

    def d_total(reals, fakes, mix):
        loss, parts = d_loss(Dc if variant == "compiled" else D, reals, fakes, alpha, tp.loss, 0.0, tp.drift_weight)
        if variant == "compiled":
            gp = gradient_penalty(D, reals, fakes, alpha, mix=mix)         # eager, uncompiled D, same weights
        else:
            gp = func_penalty(D, reals, fakes, alpha, mix)
        return loss + tp.gp_weight * gp, {**parts, "gp": gp.detach()}

    d_total_fn = torch.compile(d_total) if variant == "func_compiled" else d_total

    def step(reals, z_d, z_g, mix):
        D.requires_grad_(True)
        with torch.no_grad():
            fakes = Gc(z_d, alpha)
        loss_D, parts = d_total_fn(reals, fakes, mix)
        opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        opt_D.step()
        D.requires_grad_(False)
        loss_G = g_loss(Dc, Gc(z_g, alpha), alpha, tp.loss)
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        opt_G.step()
        step_mod.ema_update(nets.G_ema, G, tp.ema_decay)
        return torch.stack([loss_D.detach().float(), loss_G.detach().float(),
                            *[parts[k].detach().float().mean() for k in ("gp", "d_real", "d_fake")]])
    return step


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def run_variant(variant, params, res, batches, steps, device, ref=None) -> dict:
    tp = params.train
    alpha = 0.5 if res > 4 else 1.0
    nets, opt_G, opt_D = build(params, res, device)
    step = make_step(variant, nets, opt_G, opt_D, alpha, tp)
    torch._dynamo.reset()
    times, stats = [], []
    for b in batches[:CHECK_STEPS]:                          # correctness steps; the first one also compiles
        t0 = time.perf_counter()
        stats.append(step(*b))
        times.append(time.perf_counter() - t0)
    r = {"variant": variant, "first_step_s": times[0]}
    if ref is not None:
        dstats = (torch.stack(stats) - torch.stack(ref["stats"])).abs() / torch.stack(ref["stats"]).abs().clamp(min=1)
        r.update(max_abs_diff_D=max_diff(nets.D, ref["nets"].D), max_abs_diff_G=max_diff(nets.G, ref["nets"].G),
                 max_abs_diff_G_ema=max_diff(nets.G_ema, ref["nets"].G_ema),
                 max_rel_diff_stats=float(dstats.max()), step0_max_rel_diff_stats=float(dstats[0].max()),
                 stats_diff_per_step=dstats.tolist())
        r["matches_eager"] = bool(r["max_abs_diff_D"] <= TOL_PARAM and r["max_abs_diff_G"] <= TOL_PARAM
                                  and r["max_rel_diff_stats"] <= TOL_STATS_REL)
    snapshot = {"nets": copy.deepcopy(nets), "stats": stats}
    timed = batches[CHECK_STEPS:CHECK_STEPS + steps]
    t0 = time.perf_counter()
    for b in timed:
        step(*b)
    wall = time.perf_counter() - t0
    step_s = wall / len(timed)
    r.update(steps=len(timed), step_ms=1000 * step_s, img_s=len(timed) * batches[0][0].shape[0] / wall,
             compile_s=max(0.0, times[0] - step_s))
    if variant in ("compiled", "func_compiled") and res == 8:
        # Training changes alpha every minibatch during a transition: does a new alpha recompile? A float alpha
        # goes through networks._fade_weight's Python comparisons, so dynamo specializes on its value; a 0-d
        # tensor alpha does not (its first use compiles once more, the next value should not).
        for key, a in (("new_float_alpha_step_s", 0.7), ("first_tensor_alpha_step_s", torch.tensor(0.7)),
                       ("new_tensor_alpha_step_s", torch.tensor(0.8))):
            t0 = time.perf_counter()
            make_step(variant, nets, opt_G, opt_D, a, tp)(*batches[0])
            r[key] = time.perf_counter() - t0
    return r, snapshot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps, tiny nets")
    ap.add_argument("--paper-steps", type=int, default=3, help="timed steps, paper nets")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tiny-res", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--paper-res", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--cold", action="store_true", help="inductor's on-disk caches off: compile_s from scratch")
    ap.add_argument("--variants", nargs="*", default=["eager", "compiled", "func_eager", "func_compiled"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cold:
        torch._inductor.config.force_disable_caches = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    cwd = os.getcwd()
    t_start = time.time()
    for name, res_list, steps in (("tiny", args.tiny_res, args.steps), ("paper", args.paper_res, args.paper_steps)):
        if not res_list:
            continue
        params_path = bench_train.make_root(OUT / f"train_{name}", max(max(res_list), 8), 64,
                                            bench_train.CONFIGS[name], args.batch)
        os.chdir(params_path.parent)
        try:
            params = params_mod.load(params_path)
            for res in res_list:
                batches = make_batches(params, res, CHECK_STEPS + steps, device)
                ref = None
                for variant in args.variants:
                    try:
                        r, snap = run_variant(variant, params, res, batches, steps, device, ref)
                    except Exception as e:                            # report the exact error, go on
                        r, snap = {"variant": variant, "error": f"{type(e).__name__}: {e}",
                                   "traceback": traceback.format_exc()[-4000:]}, None
                        print(f"{name:5s} {res:3d}px {variant:14s} FAILED: {r['error'][:2000]}", flush=True)
                    if variant == "eager" and snap is not None:
                        ref = snap
                    r = {"config": name, "res_px": res, "batch": batches[0][0].shape[0], **r}
                    results.append(r)
                    if "error" in r:
                        continue
                    corr = ("" if "max_abs_diff_D" not in r else
                            f"  dD {r['max_abs_diff_D']:.1e} dG {r['max_abs_diff_G']:.1e} "
                            f"dstats {r['max_rel_diff_stats']:.1e} {'ok' if r['matches_eager'] else 'DIFFERS'}")
                    extra = (f"  alpha steps: new float {r['new_float_alpha_step_s']:.1f} s, first tensor "
                             f"{r['first_tensor_alpha_step_s']:.1f} s, new tensor {r['new_tensor_alpha_step_s']:.2f} s"
                             if "new_float_alpha_step_s" in r else "")
                    print(f"{name:5s} {res:3d}px {variant:14s} {r['img_s']:8.1f} img/s {r['step_ms']:8.1f} ms/step "
                          f"compile {r['compile_s']:6.1f} s{corr}{extra}", flush=True)
        finally:
            os.chdir(cwd)
    meta = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "check_steps": CHECK_STEPS,
            "inductor_caches": "off (--cold)" if args.cold else "as found on disk (compile_s may be cache-warm)",
            "tol_param_abs": TOL_PARAM, "tol_stats_rel": TOL_STATS_REL, "seconds": time.time() - t_start,
            "note": "img/s of the step alone (minibatches precomputed); shared machine: figures vary with load"}
    print("\n| config | res | variant | img/s | ms/step | speed-up | compile s | max dD | max dG | stats rel | step-1 stats rel |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['config']} | {r['res_px']} | {r['variant']} | FAILED: {r['error'][:80]} |||||||")
            continue
        base = next((q for q in results if q["config"] == r["config"] and q["res_px"] == r["res_px"]
                     and q["variant"] == "eager" and "img_s" in q), None)
        sp = f"{r['img_s'] / base['img_s']:.2f}x" if base else "-"
        c = (f"{r['max_abs_diff_D']:.1e} | {r['max_abs_diff_G']:.1e} | {r['max_rel_diff_stats']:.1e} | "
             f"{r['step0_max_rel_diff_stats']:.1e}" if "max_abs_diff_D" in r else "- | - | - | -")
        print(f"| {r['config']} | {r['res_px']} | {r['variant']} | {r['img_s']:.1f} | {r['step_ms']:.1f} | {sp} | "
              f"{r['compile_s']:.1f} | {c} |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_compile.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
