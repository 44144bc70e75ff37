"""`progan train --res R`: one growth stage of ProGAN, resumed from the stage R/2 checkpoint.

`training_loop` reads top to bottom in the order of stylegan2-ada-pytorch `training/training_loop.py`: settings,
data, networks, resume, the loop (schedule, one step, once per tick: log, stats, snapshot), outputs. It follows
tkarras/progressive_growing_of_gans `train.py` (`train_progressive_gan`): progress is counted in images (`cur_nimg`,
images of THIS stage, from which phase, alpha, ticks and snapshots follow); one D step per minibatch, and one G step
after every train.d_repeats D steps (official D_repeats, train.py L228-231: each D step on its own minibatch; a
stage's last minibatch always ends with a G step); G and D at their own learning rates (train.stages.<R>.lr {G, D}),
times the Theano ramp-up of the run's first train.lr_rampup_kimg (schedule.lr_rampup); Adam state reset at every
phase (official reset_opt_for_new_lod); generator
EMA G_ema (official Gs, G_smoothing); a log line, a loss row and maybe a snapshot once per tick. Multi-GPU: see
dist.py; rank 0 alone writes files.

Outputs (all atomic): results/<R>/checkpoint.pt, train.json, losses.tsv, samples.png (progan/checkpoint.py holds the
file formats), train_metrics.json (the final losses and img/s: progan.headline). Mid-stage state:
results/<R>/.resume/snapshot.pt every train.snapshot_kimg, deleted when the stage finishes; resuming from it is
bit-identical on the CPU.

Randomness: data order, flips, latents and gradient-penalty factors are pure functions of (seed, R, cur_nimg)
(data.py, step.py), so a resumed or multi-GPU run draws exactly what a single uninterrupted one does.
train.prefetch: minibatches one background thread reads ahead (0 = inline; memmap gathers are cheap).
MLflow goes through progan.tracking, which never raises: training never fails because of it (it attaches
samples.png / train.json / losses.tsv itself when the stage ends).
A step whose gradients are not all finite is not applied (official tfutil.py L346-355, Optimizer.apply_updates:
`tf.cond(grad_ok, apply_gradients, no_op)`), for D and G separately, without a host sync (nonfinite.py);
skipped steps are counted per tick (losses.tsv skipped_d / skipped_g, the log line, MLflow) and the stage stops
with one clear line after train.max_consecutive_skips skipped steps in a row (the official loop never stops).
Deviations: the schedule is evaluated every minibatch (official: every 4; see schedule.py); Adam's reset is done by
building new optimizers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from progan import checkpoint, gpus, headline, paths, tracking
from progan.errors import ProganError, out_of_memory_error
from progan.fileio import atomic_path, write_json, write_text
from progan.log import log, progress
from progan.pictures import image_grid, to_uint8
from progan.train import data, dist, nets as nets_mod, schedule, state, step
from progan.train.loss import penalty_resolution_factor
from progan.train.nonfinite import SKIP_KEYS, STAT_KEYS, TickStats

LOSS_COLUMNS = ["total_kimg", "stage_kimg", "phase", "alpha", *STAT_KEYS, *SKIP_KEYS, "img_s", "seconds"]


def run(params, res: int, lease: gpus.Lease | None = None) -> dict:
    """CLI entry. `lease` is the job's GPU lease, taken once by progan.cli (gpus.job_lease); None = the CPU.
    More than one leased GPU re-launches the stage under torchrun (the workers inherit the lease), else it
    trains here."""
    if res not in params.resolutions:
        raise ProganError(f"--res {res}: not a training resolution of crop.size {params.crop.size} "
                          f"(one of {', '.join(map(str, params.resolutions))})")
    if dist.in_launched_worker():          # a torchrun worker: the launcher holds the GPU lease
        return training_loop(params, res, use_cuda=torch.cuda.is_available())
    n_gpus = lease.count if lease is not None else 0
    if n_gpus > 1:
        dist.launch(params, res, n_gpus)
        return {"res_px": res, "gpus": n_gpus}
    return training_loop(params, res, use_cuda=n_gpus == 1 and torch.cuda.is_available())


def training_loop(params, res: int, use_cuda: bool, on_tick=None) -> dict:
    """Train stage `res` to its end (or resume it from its snapshot); returns train.json's dict. `on_tick(cur_nimg,
    nets, alpha)`, when given, is called on rank 0 at the end of every tick (its time is left out of the stage's)."""
    # Settings, read once: params.yaml values in the units the loop counts in (images, seconds).
    tp = params.train
    seed = int(params.seed)
    sched = schedule.StageSchedule.from_params(params, res)          # batch, lr, transition / stabilize images
    adam = nets_mod.Adam.from_params(params, res)
    gp_resolution = tp.gp_resolution                                 # dataset (official) | native
    gp_factor = penalty_resolution_factor(gp_resolution, int(params.crop.size), res)   # penalty norm / this
    step_settings = step.Settings(tp.loss, tp.gp_weight, tp.drift_weight, tp.ema_decay, gp_factor,
                                  float(tp.gp_target))                # penalty target norm (official wgan_target)
    d_repeats = int(tp.d_repeats)                                    # D steps per G step (official D_repeats)
    rampup_kimg = float(tp.lr_rampup_kimg)                           # lr ramp-up over the run's first kimg (Theano)
    max_consecutive_skips = int(tp.max_consecutive_skips)           # skipped (non-finite) steps in a row: stop
    tick_nimg = max(int(round(tp.tick_kimg * 1000)), 1)              # a log line and a loss row every tick
    snapshot_nimg = max(int(round(tp.snapshot_kimg * 1000)), 1)      # a resume snapshot every this many images
    grid_images = int(params.report.grid_images)                     # samples.png: G_ema on this many latents
    reset_opt_each_phase = bool(tp.reset_opt_each_phase)             # official reset_opt_for_new_lod
    mirror = bool(tp.mirror_augment)                                 # random horizontal flips of the reals
    prefetch = int(tp.prefetch)                                      # minibatches one thread reads ahead
    data_on_device = tp.data_on_device                               # auto | true | false
    deterministic, want_amp, want_channels_last = bool(tp.deterministic), bool(tp.amp), bool(tp.channels_last)
    resume_path = Path(paths.resume_dir(res)) / checkpoint.SNAPSHOT_NAME

    # Process: ranks and device, determinism (restored on the way out).
    env = dist.init(use_cuda)
    device = env.device
    cuda = device.type == "cuda"
    amp = want_amp and cuda                                          # bf16 autocast: CUDA only
    channels_last = want_channels_last and cuda
    autocast = autocast_context(amp)
    deterministic_before = (torch.are_deterministic_algorithms_enabled(),
                            torch.is_deterministic_algorithms_warn_only_enabled())
    _configure_determinism(deterministic, use_cuda)
    try:
        # Data: the pyramid level (memmap, or held on the device) and the seeded sampler.
        images = data.open_level(res)
        sampler = data.Sampler(len(images), seed, res, mirror)
        if data.keep_on_device(data_on_device, images.nbytes, device):
            try:
                images = data.resident_level(images, device)
            except torch.cuda.OutOfMemoryError:
                raise ProganError(f"train {res} px: the pyramid level ({images.nbytes / 2**30:.2f} GiB) does not fit "
                                  f"in {device} memory: set train.data_on_device: false in params.yaml") from None
            log.info("train %d px: pyramid level (%d images, %.2f GiB) held in %s memory (train.data_on_device %s)",
                     res, len(images), images.nbytes / 2**30, device, data_on_device)
        if sched.batch % env.world:
            raise ProganError(f"params.yaml: train.stages.{res}.batch {sched.batch} must be divisible by the "
                              f"{env.world} GPUs")

        # Networks: seeded init, the previous stage loaded, optimizers (fresh, or carried over by parameter name).
        nets = nets_mod.build_networks(params, res)
        for net in (nets.G, nets.D, nets.G_ema):
            net.to(device)
            if channels_last:
                net.to(memory_format=torch.channels_last)
        opt_G, opt_D = adam.make_pair(nets.G, nets.D)
        if nets.prev is not None and not reset_opt_each_phase:
            nets_mod.carry_optimizer_state(nets, res, opt_G, opt_D)
        prev_total_kimg = float(nets.prev["total_kimg"]) if nets.prev else 0.0

        # Resume from a mid-stage snapshot, if one was made with the same settings.
        key = {"res_px": res, "model": dataclasses.asdict(nets.cfg), "prev_checkpoint_sha256": nets.prev_sha256,
               "seed": seed, "world": env.world, "batch": sched.batch,
               **{k: params.get(k) for k in checkpoint.TRAIN_SWITCHES}}       # never resume across a switch
        snap = checkpoint.load_snapshot(resume_path)
        if snap is not None and snap["key"] != key:
            log.warning("train %d px: %s was made with other %s; starting the stage over", res, resume_path,
                        ", ".join(k for k in key if snap["key"].get(k) != key[k]))
            snap = None
        # Global RNGs: not used by the training math (it draws from cur_nimg); seeded so checkpoints reproduce.
        torch.manual_seed(step.derive_seed(seed, res, 4, env.rank))
        np.random.seed(step.derive_seed(seed, res, 6, env.rank) % 2**32)
        random.seed(step.derive_seed(seed, res, 7, env.rank))
        start_nimg, rows, seconds_before = 0, [], 0.0               # where this run starts, within the stage
        if snap is not None:
            changed = [k for k, v in params.to_dict()["train"].items() if snap["params"]["train"].get(k) != v]
            if changed:
                log.warning("train %d px: resuming with changed train.%s", res, ", train.".join(changed))
            for net, name in ((nets.G, "G"), (nets.D, "D"), (nets.G_ema, "G_ema")):
                net.load_state_dict(snap[name])
            opt_G.load_state_dict(snap["opt_G"]), opt_D.load_state_dict(snap["opt_D"])
            for opt, lr in zip((opt_G, opt_D), sched.lrs):
                for group in opt.param_groups:
                    group["lr"] = lr
            state.set_rng_state(snap["rng"][env.rank])
            start_nimg, rows, seconds_before = int(snap["cur_nimg"]), list(snap["rows"]), float(snap["seconds"])
            log.info("train %d px: resuming from %s at stage kimg %.1f", res, resume_path, start_nimg / 1000)
        z_grid = step.fixed_latents(seed, grid_images, nets.cfg.latent_dim)

        with tracking.stage_run(params, res=res, job="train") as tr:   # rank 0 logs; never raises
            tr.log_params({"train.world_size": env.world, "train.device": device.type})
            log.info("train %d px on %s x%d: %.1f kimg (transition %.1f + stabilize %.1f), batch %d, lr G %g D %g, "
                     "penalty norm / %g (train.gp_resolution %s), from %s",
                     res, device.type, env.world, sched.total_nimg / 1000, sched.transition_nimg / 1000,
                     sched.stabilize_nimg / 1000, sched.batch, *sched.lrs, gp_factor, gp_resolution,
                     nets.source)

            # The loop: one iteration per global minibatch; cur_nimg = images shown in this stage so far.
            cur_nimg = start_nimg
            alpha = schedule.alpha(sched, cur_nimg)
            snapshot_nimg_done = None if snap is None else start_nimg     # the last good snapshot, for messages
            stats = TickStats(device)                                     # sums over the tick, on the device
            tick_start_nimg, tick_start_time = cur_nimg, time.time()
            stage_start_time = tick_start_time - seconds_before
            bar = None
            batches = data.Batches(images, sampler, sched.batch, start_nimg, sched.total_nimg, env.rank, env.world,
                                   prefetch=prefetch, pin_memory=cuda)
            for cur_nimg, x_u8, flip in batches:
                phase, alpha = schedule.phase(sched, cur_nimg), schedule.alpha(sched, cur_nimg)
                prev_nimg = cur_nimg - sched.batch if cur_nimg else None        # the minibatch before, in the stage
                if reset_opt_each_phase and schedule.reset_optimizer(sched, prev_nimg, cur_nimg):
                    opt_G, opt_D = adam.make_pair(nets.G, nets.D)
                group_nimg = cur_nimg - (cur_nimg // sched.batch % d_repeats) * sched.batch   # its D repeats' first
                if rampup_kimg > 0:     # Theano train.py L207-210: lrate_coef * G_ / D_learning_rate_max, set once
                    coef = schedule.lr_rampup(prev_total_kimg + group_nimg / 1000, rampup_kimg)   # per G iteration
                    for opt, lr in zip((opt_G, opt_D), sched.lrs):
                        for group in opt.param_groups:
                            group["lr"] = coef * lr
                # a G step after every d_repeats-th D step, and after the stage's last one (official D_repeats)
                g_step = (cur_nimg // sched.batch + 1) % d_repeats == 0 or cur_nimg + sched.batch >= sched.total_nimg
                if env.is_main and (bar is None or schedule.phase(sched, cur_nimg - sched.batch) != phase):
                    bar = _phase_bar(bar, sched, res, phase, cur_nimg)

                try:     # a batch too large for the device fails in any allocation of the step, its inputs too
                    inputs = step.step_inputs(seed, res, sched.batch, cur_nimg, x_u8, flip, alpha, nets.cfg.latent_dim,
                                              device, channels_last, env.rank, env.world)
                    stats.add(step.train_step(nets, opt_G, opt_D, inputs, step_settings, env.world, autocast, g_step),
                              g_step)
                except torch.cuda.OutOfMemoryError as e:
                    raise _out_of_memory(e, res, sched, cur_nimg, phase, resume_path, snapshot_nimg_done,
                                          grows=nets.prev is not None) from e
                cur_nimg += sched.batch
                if bar is not None:
                    bar.update(sched.batch / 1000)

                # Once per tick: sync the stats, check them, log a row, maybe snapshot.
                done = cur_nimg >= sched.total_nimg
                if cur_nimg - tick_start_nimg < tick_nimg and not done:
                    continue
                values, max_run = stats.read(env.world)                     # the one host sync per tick
                now = time.time()
                row = {"total_kimg": prev_total_kimg + cur_nimg / 1000, "stage_kimg": cur_nimg / 1000,
                       "phase": phase, "alpha": alpha, **values,
                       "img_s": (cur_nimg - tick_start_nimg) / max(now - tick_start_time, 1e-9),
                       "seconds": now - stage_start_time}
                if max_run >= max_consecutive_skips:
                    means = ", ".join(f"{k}={values[k]:.4g}" for k in STAT_KEYS)
                    raise ProganError(
                        f"train {res} px: non-finite loss or gradients in {max_run} consecutive steps, all skipped "
                        f"(train.max_consecutive_skips {max_consecutive_skips}; tick means {means}) at stage kimg "
                        f"{cur_nimg / 1000:.3f} ({phase}); {_kept(resume_path, snapshot_nimg_done)}; lower "
                        f"train.stages.{res}.lr and run `progan train --res {res}` again")
                rows.append(row)
                skipped = values["skipped_d"] + values["skipped_g"]
                log.info("train %dpx kimg %.3f (total %.3f) %s alpha %.3f d_loss %.4f g_loss %.4f gp %.4f "
                         "d_real %.4f d_fake %.4f %.1f img/s%s", res, row["stage_kimg"], row["total_kimg"], phase,
                         alpha, *(values[k] for k in STAT_KEYS), row["img_s"],
                         f" skipped D {values['skipped_d']} G {values['skipped_g']} (non-finite gradients)"
                         if skipped else "")
                tr.log_metrics({**{k: row[k] for k in STAT_KEYS + SKIP_KEYS if math.isfinite(row[k])},
                                "alpha": alpha, "img_s": row["img_s"]}, step_kimg=row["total_kimg"])
                stats.next_tick()
                crossed_snapshot = cur_nimg // snapshot_nimg > tick_start_nimg // snapshot_nimg
                tick_start_nimg, tick_start_time = cur_nimg, now
                if not done and crossed_snapshot and _write_snapshot(
                        resume_path, key, nets, opt_G, opt_D, cur_nimg, sampler, rows, now - stage_start_time,
                        params, env):
                    snapshot_nimg_done = cur_nimg
                if on_tick is not None and env.is_main:       # e.g. bench/bench_quality.py's SWD at fixed points
                    hook_start = time.time()
                    on_tick(cur_nimg, nets, alpha)
                    hook_seconds = time.time() - hook_start       # not training's: out of img/s and seconds
                    tick_start_time += hook_seconds
                    stage_start_time += hook_seconds
            if bar is not None:
                bar.close()

            # Outputs (rank 0): losses, samples, summary, checkpoint; then the resume state goes.
            seconds = time.time() - stage_start_time
            total_kimg = prev_total_kimg + cur_nimg / 1000
            info = {"res_px": res, "kimg": cur_nimg / 1000, "total_kimg": total_kimg, "seconds": seconds,
                    "img_per_s": (cur_nimg - start_nimg) / max(seconds - seconds_before, 1e-9),
                    "final": {k: rows[-1][k] for k in STAT_KEYS} if rows else {},
                    "skipped_steps": {k: int(sum(r.get(k, 0) for r in rows)) for k in SKIP_KEYS},
                    "alpha": alpha, "ticks": len(rows), "gpus": env.world, "device": device.type,
                    "resumed_from_kimg": start_nimg / 1000 if snap is not None else None,
                    "grown_keys": len(nets.grown_keys)}
            if env.is_main:
                write_text(paths.losses_tsv(res), losses_tsv_text(rows))
                with torch.no_grad(), autocast():
                    fakes = torch.cat([nets.G_ema(z.to(device), alpha) for z in z_grid.split(sched.batch)])
                save_grid(paths.samples_png(res), fakes)
                write_json(paths.train_json(res), info)
                write_json(paths.train_metrics_json(res), headline.training(info))   # DVC metrics
                checkpoint.save(paths.checkpoint(res), checkpoint.stage_checkpoint(
                    res_px=res, cfg=nets.cfg, G=nets.G, D=nets.D, G_ema=nets.G_ema, opt_G=opt_G, opt_D=opt_D,
                    cur_nimg=cur_nimg, total_kimg=total_kimg, alpha=alpha, rng=state.get_rng_state(),
                    params=_stage_params(params, res), prev_sha256=nets.prev_sha256))
                tr.log_metrics({"img_per_s": info["img_per_s"], "seconds": seconds}, step_kimg=total_kimg)
                shutil.rmtree(paths.resume_dir(res), ignore_errors=True)
                log.info("train %d px: done, %.1f kimg in %.0f s (%.1f img/s) -> %s", res, cur_nimg / 1000, seconds,
                         info["img_per_s"], paths.checkpoint(res))
            dist.barrier(env)
        return info
    finally:
        _set_deterministic(*deterministic_before)
        dist.shutdown(env)


# --------------------------------------------------------------------------------------------------------------
# Pieces of the loop.

def autocast_context(amp: bool):
    """The context each forward pass of a step runs in: bf16 autocast on CUDA for train.amp (the caller passes
    amp only on CUDA), else nothing (fp32)."""
    return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext


def _phase_bar(bar, sched, res: int, phase: str, cur_nimg: int):
    """A progress bar (kimg) for the phase that starts, or is resumed, at cur_nimg; the previous one is closed."""
    if bar is not None:
        bar.close()
    lo, hi = schedule.phase_bounds_nimg(sched, phase)
    return progress(total=round((hi - lo) / 1000, 3), initial=round((cur_nimg - lo) / 1000, 3),
                    desc=f"train {res}px {phase}", unit="kimg", disable=None)


def save_grid(path: str, images: torch.Tensor) -> None:
    """[N, 3, H, W] generator output -> a PNG grid (pictures.to_uint8, pictures.image_grid), written atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(image_grid(to_uint8(images))).save(tmp)


def losses_tsv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    out.write("\t".join(LOSS_COLUMNS) + "\n")
    for r in rows:
        r = {**dict.fromkeys(SKIP_KEYS, 0), **r}        # rows of a snapshot written before the skip counts existed
        out.write("\t".join(r[k] if isinstance(r[k], str) else f"{r[k]:.6g}" for k in LOSS_COLUMNS) + "\n")
    return out.getvalue()


def _stage_params(params, res: int) -> dict:
    """The params this stage ran with: exactly the keys it declares to Snakemake and DVC (pipeline.py), so a
    change to another key (say evaluate.num_images) cannot change the checkpoint's bytes and re-run what follows."""
    from progan import pipeline

    return params.subset(pipeline.job(params, "train", res).params)


def _write_snapshot(path: Path, key: dict, nets: nets_mod.Nets, opt_G, opt_D, cur_nimg: int, sampler: data.Sampler,
                    rows: list, seconds: float, params, env: dist.DistEnv) -> bool:
    """Everything needed to continue bit-identically; written by rank 0 after every rank reached the same step.
    Returns False (and keeps the previous snapshot) when the weights are no longer finite."""
    rng = dist.gather_objects(state.get_rng_state(), env)
    with torch.no_grad():
        finite = bool(torch.stack([p.float().sum() for p in nets.G.parameters()] +
                                  [p.float().sum() for p in nets.D.parameters()]).isfinite().all())
    if env.is_main:
        if not finite:
            log.warning("train: non-finite weights at stage kimg %.3f; keeping the previous snapshot", cur_nimg / 1000)
        else:
            checkpoint.save(path, checkpoint.snapshot(
                key=key, cur_nimg=cur_nimg, G=nets.G, D=nets.D, G_ema=nets.G_ema, opt_G=opt_G, opt_D=opt_D, rng=rng,
                sampler=sampler.state(cur_nimg), rows=rows, seconds=seconds, params=params.to_dict()))
            log.info("train: snapshot at stage kimg %.3f -> %s", cur_nimg / 1000, path)
    dist.barrier(env)
    return finite


def _kept(resume_path: Path, snapshot_nimg: int | None) -> str:
    return (f"last good snapshot {resume_path} (stage kimg {snapshot_nimg / 1000:.3f}) kept"
            if snapshot_nimg is not None else "no snapshot yet")


def _out_of_memory(err, res: int, sched, step_nimg: int, phase: str, resume_path: Path,
                   snapshot_nimg: int | None, grows: bool = True) -> ProganError:
    """CUDA OOM in a training step: lower train.stages.<res>.batch. A snapshot resumes only with the batch it was
    made with (its key), so the message says the stage then restarts from the previous checkpoint."""
    start = paths.checkpoint(res // 2) if grows else "scratch"
    if snapshot_nimg is None:
        kept = f"no snapshot yet; the stage restarts from {start}" + (", which is untouched" if grows else "")
    else:
        kept = (f"the snapshot {resume_path} (stage kimg {snapshot_nimg / 1000:.3f}) is kept, but it resumes only "
                f"with batch {sched.batch}: with a lower batch the stage restarts from {start}")
    return out_of_memory_error(err, f"train {res} px at stage kimg {step_nimg / 1000:.3f} ({phase})",
                               f"train.stages.{res}.batch", sched.batch, f"progan train --res {res}", kept)


def _set_deterministic(mode: bool, warn_only: bool) -> None:
    """torch.use_deterministic_algorithms without its import of torch._inductor (2-3 s per job on a small CPU):
    we never compile, so only the eager flag matters."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:  # pragma: no cover - other torch versions
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        setter(mode, warn_only=warn_only)


def _configure_determinism(deterministic: bool, use_cuda: bool) -> None:
    """CPU: deterministic algorithms (resumed runs are bit-identical). CUDA: the same, but warn-only, since some
    backward kernels the nets need (nearest upsampling) have no deterministic CUDA version and would raise."""
    if deterministic:
        if use_cuda:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
        _set_deterministic(True, warn_only=use_cuda)
    elif use_cuda:
        torch.backends.cudnn.benchmark = True
