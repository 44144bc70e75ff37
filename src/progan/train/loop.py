"""`progan train --res R`: one growth stage of ProGAN, resumed from the stage R/2 checkpoint.

Reads top to bottom like stylegan2-ada `training/training_loop.py`, following tkarras/progressive_growing_of_gans
`train.py` (`train_progressive_gan`): progress is counted in images (`cur_nimg`, images of THIS stage);
one D step then one G step per minibatch (official D_repeats=1); Adam state reset at every phase
(official reset_opt_for_new_lod); generator EMA G_ema (official Gs, G_smoothing); a log line, a loss
row and maybe a snapshot once per tick. Multi-GPU: see dist.py; rank 0 alone writes files.

Outputs (all atomic): results/<R>/checkpoint.pt, train.json, losses.tsv, samples.png. Mid-stage state:
results/<R>/.resume/snapshot.pt every train.snapshot_kimg, deleted when the stage finishes.

Randomness: data order, flips, latents and gradient-penalty factors are pure functions of (seed, R, cur_nimg)
(data.py, `latents`, `gp_mix`), so a resumed or multi-GPU run draws exactly what a single uninterrupted one
does. train.prefetch: minibatches one background thread reads ahead (0 = inline; memmap gathers are cheap).
MLflow goes through progan.tracking, guarded: training never fails because of it (tracking attaches
samples.png / train.json / losses.tsv itself when the stage ends).
A step whose gradients are not all finite is not applied (official tfutil.py L346-355, Optimizer.apply_updates:
`tf.cond(grad_ok, apply_gradients, no_op)`), for D and G separately, without a host sync (`step_if_finite`);
skipped steps are counted per tick (losses.tsv skipped_d / skipped_g, the log line, MLflow) and the stage stops
with one clear line after train.max_consecutive_skips skipped steps in a row (the official loop never stops).
Deviations: the schedule is evaluated every minibatch (official: every 4); Adam's reset is done by
building new optimizers.
"""
from __future__ import annotations

import contextlib
import copy
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

from progan import checkpoint, gpus, paths
from progan.errors import ProganError, out_of_memory_error
from progan.fileio import atomic_path, sha256_file, write_json, write_text
from progan.log import log, progress
from progan.model.networks import Discriminator, Generator, ModelConfig, fade_reals, load_grown
from progan.pictures import image_grid, to_uint8
from progan.train import data, dist, schedule, state
from progan.train.loss import d_loss, g_loss, gradient_penalty, penalty_resolution_factor
from progan.train.nonfinite import SKIP_KEYS, STAT_KEYS, TickStats, step_if_finite

LOSS_COLUMNS = ["total_kimg", "stage_kimg", "phase", "alpha", *STAT_KEYS, *SKIP_KEYS, "img_s", "seconds"]


def run(params, res: int, lease: gpus.Lease | None = None) -> dict:
    """CLI entry. `lease` is the job's GPU lease, taken once by progan.cli (gpus.job_lease); None = the CPU.
    More than one leased GPU re-launches the stage under torchrun (the workers inherit the lease), else it
    trains here."""
    if res not in params.resolutions:
        raise ProganError(f"--res {res}: not a training resolution of crop.size {params.crop.size} "
                          f"(one of {', '.join(map(str, params.resolutions))})")
    if dist.in_launched_worker():          # a torchrun worker: the launcher holds the GPU lease
        return train_stage(params, res, use_cuda=torch.cuda.is_available())
    n_gpus = lease.count if lease is not None else 0
    if n_gpus > 1:
        dist.launch(params, res, n_gpus)
        return {"res_px": res, "gpus": n_gpus}
    return train_stage(params, res, use_cuda=n_gpus == 1 and torch.cuda.is_available())


def _seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (numpy SeedSequence): init, latents and per-rank RNGs never collide."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def latents(seed: int, res_px: int, cur_nimg: int, which: int, batch: int, dim: int) -> torch.Tensor:
    """Global minibatch of latents [batch, dim] (CPU) as a pure function of cur_nimg: resumable, and the same
    on every rank (each keeps rows rank::world). which: 2 = D step, 3 = G step."""
    g = torch.Generator().manual_seed(_seed(seed, res_px, which, cur_nimg))
    return torch.randn(batch, dim, generator=g)


def gp_mix(seed: int, res_px: int, cur_nimg: int, batch: int) -> torch.Tensor:
    """Gradient-penalty interpolation factors u ~ U(0, 1) [batch] of the global minibatch (official
    D_wgangp_acgan mixing_factors), a pure function of cur_nimg like `latents`."""
    g = torch.Generator().manual_seed(_seed(seed, res_px, 5, cur_nimg))
    return torch.rand(batch, generator=g)


def fixed_latents(params, dim: int) -> torch.Tensor:
    """The sample-grid latents [report.grid_images, dim]: seeded by params.seed alone, the same every stage."""
    g = torch.Generator().manual_seed(int(params.seed))
    return torch.randn(int(params.report.grid_images), dim, generator=g)


# --------------------------------------------------------------------------------------------------------------
# Networks.

@dataclasses.dataclass
class Nets:
    G: torch.nn.Module
    D: torch.nn.Module
    G_ema: torch.nn.Module
    cfg: ModelConfig
    prev: dict | None              # the stage R/2 checkpoint (None at 4x4)
    prev_sha256: str | None
    grown_keys: list[str]          # G keys new at this resolution (G_ema copies them from G)


def build_networks(params, res: int) -> Nets:
    """G, D, G_ema at `res` on the CPU: seeded init, then the stage R/2 weights loaded with `load_grown`.

    New layers of G_ema start as copies of G's new layers (official: Gs is cloned from G at construction;
    the grown layers of both come from the same init).
    """
    cfg = ModelConfig.from_params(params)
    torch.manual_seed(_seed(params.seed, res, 1))
    G, D = Generator(cfg, res), Discriminator(cfg, res)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    if res == 4:
        return Nets(G, D, G_ema, cfg, None, None, sorted(G.state_dict()))
    prev_path = Path(paths.checkpoint(res // 2))
    prev = checkpoint.load_stage(prev_path, res // 2)
    if prev["model"] != dataclasses.asdict(cfg):
        changed = sorted(k for k in set(prev["model"]) | set(dataclasses.asdict(cfg))
                         if prev["model"].get(k) != dataclasses.asdict(cfg).get(k))
        raise ProganError(f"{prev_path}: trained with other model params ({', '.join(changed)}); "
                          f"re-run every stage from `progan train --res 4` or restore params.yaml model.*")
    try:
        grown = load_grown(G, prev["G"])
        load_grown(D, prev["D"])
        grown_ema = load_grown(G_ema, prev["G_ema"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ProganError(f"{prev_path}: weights do not fit the {res} px networks ({str(e).splitlines()[0][:120]}); "
                          f"re-run `progan train --res {res // 2}`") from None
    g_state = G.state_dict()
    with torch.no_grad():
        for k in grown_ema:
            G_ema.state_dict()[k].copy_(g_state[k])
    return Nets(G, D, G_ema, cfg, prev, sha256_file(prev_path), sorted(grown))


def make_optimizer(net: torch.nn.Module, params, res: int) -> torch.optim.Adam:
    """Adam with the paper's betas (0, 0.99) and eps 1e-8 (§A.1; official G_opt/D_opt, config.py L45-46).
    Fused: one kernel per step, and it honours `found_inf` (see `step_if_finite`)."""
    return torch.optim.Adam(net.parameters(), lr=params.stage(res).lr, betas=tuple(params.train.betas),
                            eps=params.train.adam_eps, fused=True)


@torch.no_grad()
def ema_update(G_ema: torch.nn.Module, G: torch.nn.Module, decay: float) -> None:
    """G_ema <- G + decay * (G_ema - G) for every parameter in one fused call (official Gs.setup_as_moving_average_of
    with beta = G_smoothing); buffers are copied."""
    ema_p = [p for p in G_ema.parameters()]
    g_p = [p.detach() for p in G.parameters()]
    torch._foreach_lerp_(ema_p, g_p, 1.0 - decay)
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        b_ema.copy_(b)


# --------------------------------------------------------------------------------------------------------------
# One minibatch.

def step_inputs(params, res: int, batch: int, step_nimg: int, x_u8: torch.Tensor, flip: torch.Tensor, alpha: float,
                latent_dim: int, device: torch.device, channels_last: bool = False, rank: int = 0, world: int = 1):
    """(reals, z_d, z_g, mix) of this rank for the minibatch at step_nimg, on `device`: reals from the uint8 batch
    (official process_reals: [-1, 1], mirror, FadeLOD above 4 px), latents and penalty factors drawn from
    step_nimg, their rows rank::world, copied without a host sync (data.host_to_device)."""
    reals = data.to_device(x_u8, flip, device, channels_last)            # [n, 3, R, R] in [-1, 1]
    if res > 4:
        reals = fade_reals(reals, alpha)                                  # official process_reals FadeLOD
    z_d, z_g = (data.host_to_device(latents(params.seed, res, step_nimg, which, batch, latent_dim)[rank::world],
                                    device) for which in (2, 3))
    mix = data.host_to_device(gp_mix(params.seed, res, step_nimg, batch)[rank::world], device)
    return reals, z_d, z_g, mix


def train_step(nets: Nets, opt_G, opt_D, reals: torch.Tensor, z_d: torch.Tensor, z_g: torch.Tensor,
               mix: torch.Tensor, alpha: float, tp, world: int, autocast=contextlib.nullcontext,
               gp_resolution_factor: float = 1.0) -> torch.Tensor:
    """One D step then one G step (official D_repeats=1) and the EMA update. reals, z_d, z_g, mix: this rank's
    rows of the global minibatch; mix [n] are the gradient-penalty interpolation factors u ~ U(0, 1);
    gp_resolution_factor: loss.penalty_resolution_factor (train.gp_resolution). A step with non-finite
    gradients is skipped (`step_if_finite`).

    Returns the detached stats [d_loss, g_loss, gp, d_real, d_fake, d_skipped, g_skipped] (no host sync).
    """
    G, D = nets.G, nets.D
    # D step: fakes from G without graph; WGAN-GP loss with drift (loss.py). The penalty is added here with
    # our own `mix` (drawn from cur_nimg like the latents) rather than loss.py's global-RNG draw, so that
    # k GPUs compute exactly the single-GPU minibatch and a resumed run needs no RNG state.
    D.requires_grad_(True)
    with torch.no_grad(), autocast():
        fakes = G(z_d, alpha)
    use_gp = tp.loss == "wgan-gp" and tp.gp_weight > 0
    with autocast():
        loss_D, parts = d_loss(D, reals, fakes, alpha, tp.loss, 0.0, tp.drift_weight)
        if use_gp:
            gp = gradient_penalty(D, reals, fakes, alpha, mix=mix, resolution_factor=gp_resolution_factor)
            loss_D = loss_D + tp.gp_weight * gp
            parts = {**parts, "gp": gp.detach()}
    opt_D.zero_grad(set_to_none=True)
    loss_D.backward()
    dist.average_gradients(list(D.parameters()), world)
    d_skipped = step_if_finite(opt_D)
    # G step with fresh latents; D's weights frozen so no D gradients are computed.
    D.requires_grad_(False)
    with autocast():
        loss_G = g_loss(D, G(z_g, alpha), alpha, tp.loss)
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    dist.average_gradients(list(G.parameters()), world)
    g_skipped = step_if_finite(opt_G)
    ema_update(nets.G_ema, G, tp.ema_decay)      # also after a skipped G step, as official Gs_update_op
    zero = loss_D.detach().new_zeros(())
    return torch.stack([loss_D.detach().float(), loss_G.detach().float(),
                        *[parts.get(k, zero).detach().float().mean() for k in ("gp", "d_real", "d_fake")],
                        d_skipped.to(zero.device), g_skipped.to(zero.device)])


# --------------------------------------------------------------------------------------------------------------
# Files.

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


class _Tracking:
    """progan.tracking through a guard: training never fails because MLflow (or the module) is missing."""

    def __init__(self, params, res: int, enabled: bool):
        self.params, self.res, self.enabled = params, res, enabled
        self._cm = self._tr = None

    def __enter__(self):
        if not self.enabled:
            return self
        try:
            from progan import tracking
        except ImportError as e:
            log.info("MLflow tracking off (%s)", e)
            return self
        try:
            self._cm = tracking.stage_run(self.params, res=self.res, job="train")
            self._tr = self._cm.__enter__()
        except Exception as e:  # tracking is optional: report it and go on
            log.warning("MLflow tracking off: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
            self._cm = self._tr = None
        return self

    def __getattr__(self, name):
        def call(*args, **kwargs):
            if self._tr is None:
                return
            try:
                getattr(self._tr, name)(*args, **kwargs)
            except Exception as e:  # tracking is optional: report it and go on
                log.warning("MLflow %s failed (tracking off from now): %s", name, str(e).splitlines()[0][:200])
                self._tr = None
        return call

    def __exit__(self, *exc):
        if self._cm is not None:
            try:
                self._cm.__exit__(*exc)
            except Exception as e:  # tracking is optional: report it and go on
                log.warning("MLflow run end failed: %s", str(e).splitlines()[0][:200])
        return False


# --------------------------------------------------------------------------------------------------------------
# The stage.

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


def _snapshot_key(params, res: int, nets: Nets, world: int) -> dict:
    """What must match for a snapshot to be resumed; other param changes resume with a warning."""
    return {"res_px": res, "model": dataclasses.asdict(nets.cfg), "prev_checkpoint_sha256": nets.prev_sha256,
            "seed": int(params.seed), "world": world, "batch": int(params.stage(res).batch)}


def train_stage(params, res: int, use_cuda: bool) -> dict:
    tp = params.train                                     # train.* knobs
    env = dist.init(use_cuda)
    device = env.device
    prev_deterministic = torch.are_deterministic_algorithms_enabled()
    prev_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    _configure_determinism(tp.deterministic, use_cuda)
    try:
        return _train(params, res, tp, env, device)
    finally:
        _set_deterministic(prev_deterministic, warn_only=prev_warn_only)
        dist.shutdown(env)


def _train(params, res: int, tp, env: dist.DistEnv, device: torch.device) -> dict:
    sched = schedule.StageSchedule.from_params(params, res)
    gp_factor = penalty_resolution_factor(tp.gp_resolution, int(params.crop.size), res)
    cuda = device.type == "cuda"
    amp = bool(tp.amp) and cuda                           # bf16 autocast: CUDA only
    channels_last = bool(tp.channels_last) and cuda
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    resume_path = Path(paths.resume_dir(res)) / checkpoint.SNAPSHOT_NAME

    # Data.
    images = data.open_level(res)
    sampler = data.Sampler(len(images), params.seed, res, tp.mirror_augment)
    if data.keep_on_device(tp.data_on_device, images.nbytes, device):
        try:
            images = data.resident_level(images, device)
        except torch.cuda.OutOfMemoryError:
            raise ProganError(f"train {res} px: the pyramid level ({images.nbytes / 2**30:.2f} GiB) does not fit in "
                              f"{device} memory: set train.data_on_device: false in params.yaml") from None
        log.info("train %d px: pyramid level (%d images, %.2f GiB) held in %s memory (train.data_on_device %s)",
                 res, len(images), images.nbytes / 2**30, device, tp.data_on_device)
    if sched.batch % env.world:
        raise ProganError(f"params.yaml: train.stages.{res}.batch {sched.batch} must be divisible by the "
                          f"{env.world} GPUs")

    # Networks: seeded init, previous stage loaded, optimizers (fresh, or carried over by parameter name).
    nets = build_networks(params, res)
    nets.G.to(device), nets.D.to(device), nets.G_ema.to(device)
    if channels_last:
        for net in (nets.G, nets.D, nets.G_ema):
            net.to(memory_format=torch.channels_last)
    opt_G, opt_D = make_optimizer(nets.G, params, res), make_optimizer(nets.D, params, res)
    if nets.prev is not None and not tp.reset_opt_each_phase:
        prev_G, prev_D = Generator(nets.cfg, res // 2), Discriminator(nets.cfg, res // 2)
        for opt, prev_net, net, key in ((opt_G, prev_G, nets.G, "opt_G"), (opt_D, prev_D, nets.D, "opt_D")):
            opt.load_state_dict(state.remap_optimizer_state(nets.prev[key], [n for n, _ in prev_net.named_parameters()],
                                                            [n for n, _ in net.named_parameters()]))
    prev_total_kimg = float(nets.prev["total_kimg"]) if nets.prev else 0.0

    # Resume from a mid-stage snapshot, if any.
    cur_nimg, rows, seconds_before, resumed_kimg = 0, [], 0.0, None
    key = _snapshot_key(params, res, nets, env.world)
    snap = checkpoint.load_snapshot(resume_path)
    if snap is not None and snap["key"] != key:
        log.warning("train %d px: %s was made with other %s; starting the stage over", res, resume_path,
                    ", ".join(k for k in key if snap["key"].get(k) != key[k]))
        snap = None
    # Global RNGs (not used by the training math, which draws from cur_nimg; seeded so checkpoints reproduce).
    torch.manual_seed(_seed(params.seed, res, 4, env.rank))
    np.random.seed(_seed(params.seed, res, 6, env.rank) % 2**32)
    random.seed(_seed(params.seed, res, 7, env.rank))
    if snap is not None:
        changed = [k for k, v in params.to_dict()["train"].items() if snap["params"]["train"].get(k) != v]
        if changed:
            log.warning("train %d px: resuming with changed train.%s", res, ", train.".join(changed))
        nets.G.load_state_dict(snap["G"]), nets.D.load_state_dict(snap["D"]), nets.G_ema.load_state_dict(snap["G_ema"])
        opt_G.load_state_dict(snap["opt_G"]), opt_D.load_state_dict(snap["opt_D"])
        for group in (*opt_G.param_groups, *opt_D.param_groups):
            group["lr"] = sched.lr
        state.set_rng_state(snap["rng"][env.rank])
        cur_nimg, rows, seconds_before = int(snap["cur_nimg"]), list(snap["rows"]), float(snap["seconds"])
        resumed_kimg = cur_nimg / 1000
        log.info("train %d px: resuming from %s at stage kimg %.1f", res, resume_path, resumed_kimg)
    z_grid = fixed_latents(params, nets.cfg.latent_dim)

    with _Tracking(params, res, enabled=env.is_main) as tr:
        tr.log_params({"train.world_size": env.world, "train.device": device.type})  # tracking logs the stage's params
        log.info("train %d px on %s x%d: %.1f kimg (transition %.1f + stabilize %.1f), batch %d, lr %g, "
                 "penalty norm / %g (train.gp_resolution %s), from %s",
                 res, device.type, env.world, sched.total_nimg / 1000, sched.transition_nimg / 1000,
                 sched.stabilize_nimg / 1000, sched.batch, sched.lr, gp_factor, tp.gp_resolution,
                 paths.checkpoint(res // 2) if nets.prev else "scratch")

        # Training loop: one iteration per global minibatch.
        batches = data.Batches(images, sampler, sched.batch, cur_nimg, sched.total_nimg, env.rank, env.world,
                               prefetch=int(tp.prefetch), pin_memory=cuda)
        stats = TickStats(device)
        tick_start_nimg, tick_start_time = cur_nimg, time.time()
        tick_nimg = max(int(round(tp.tick_kimg * 1000)), 1)
        snapshot_nimg = max(int(round(tp.snapshot_kimg * 1000)), 1)
        next_snapshot = (cur_nimg // snapshot_nimg + 1) * snapshot_nimg
        stage_start_time = time.time() - seconds_before
        bar, bar_phase = None, None
        last_snapshot_kimg = resumed_kimg
        alpha = schedule.alpha(sched, cur_nimg)
        for step_nimg, x_u8, flip in batches:
            phase = schedule.phase(sched, step_nimg)
            alpha = schedule.alpha(sched, step_nimg)
            prev_nimg = step_nimg - sched.batch if step_nimg > 0 else None
            if tp.reset_opt_each_phase and schedule.reset_optimizer(sched, prev_nimg, step_nimg):
                opt_G, opt_D = make_optimizer(nets.G, params, res), make_optimizer(nets.D, params, res)
            if env.is_main and phase != bar_phase:
                if bar is not None:
                    bar.close()
                lo, hi = schedule.phase_bounds_nimg(sched, phase)
                bar = progress(total=round((hi - lo) / 1000, 3), initial=round((step_nimg - lo) / 1000, 3),
                               desc=f"train {res}px {phase}", unit="kimg", disable=None)
                bar_phase = phase

            inputs = step_inputs(params, res, sched.batch, step_nimg, x_u8, flip, alpha, nets.cfg.latent_dim,
                                 device, channels_last, env.rank, env.world)
            try:
                stats.add(train_step(nets, opt_G, opt_D, *inputs, alpha, tp, env.world, autocast, gp_factor))
            except torch.cuda.OutOfMemoryError as e:
                raise _out_of_memory(e, res, sched, step_nimg, phase, resume_path, last_snapshot_kimg) from e
            cur_nimg = step_nimg + sched.batch
            if bar is not None:
                bar.update(sched.batch / 1000)

            # Once per tick: sync the stats, check them, log a row, maybe snapshot.
            done = cur_nimg >= sched.total_nimg
            if cur_nimg - tick_start_nimg < tick_nimg and not done:
                continue
            values, max_run = stats.read(env.world)                             # the one host sync per tick
            now = time.time()
            row = {"total_kimg": prev_total_kimg + cur_nimg / 1000, "stage_kimg": cur_nimg / 1000, "phase": phase,
                   "alpha": alpha, **values, "img_s": (cur_nimg - tick_start_nimg) / max(now - tick_start_time, 1e-9),
                   "seconds": now - stage_start_time}
            if max_run >= tp.max_consecutive_skips:
                last = (f"last good snapshot {resume_path} (stage kimg {last_snapshot_kimg:.3f}) kept"
                        if last_snapshot_kimg is not None else "no snapshot yet")
                raise ProganError(
                    f"train {res} px: non-finite loss or gradients in {max_run} consecutive steps, all skipped "
                    f"(train.max_consecutive_skips {tp.max_consecutive_skips}; tick means "
                    f"{', '.join(f'{k}={values[k]:.4g}' for k in STAT_KEYS)}) at stage kimg {cur_nimg / 1000:.3f} "
                    f"({phase}); {last}; lower train.stages.{res}.lr and run `progan train --res {res}` again")
            rows.append(row)
            skipped = values["skipped_d"] + values["skipped_g"]
            log.info("train %dpx kimg %.3f (total %.3f) %s alpha %.3f d_loss %.4f g_loss %.4f gp %.4f "
                     "d_real %.4f d_fake %.4f %.1f img/s%s", res, row["stage_kimg"], row["total_kimg"], phase, alpha,
                     *(values[k] for k in STAT_KEYS), row["img_s"],
                     f" skipped D {values['skipped_d']} G {values['skipped_g']} (non-finite gradients)" if skipped else "")
            tr.log_metrics({**{k: row[k] for k in STAT_KEYS + SKIP_KEYS if math.isfinite(row[k])}, "alpha": alpha,
                            "img_s": row["img_s"]}, step_kimg=row["total_kimg"])
            stats.next_tick()
            tick_start_nimg, tick_start_time = cur_nimg, now
            if not done and cur_nimg >= next_snapshot:
                if _write_snapshot(resume_path, nets, opt_G, opt_D, cur_nimg, rows, now - stage_start_time, key,
                                   params, sampler, env):
                    last_snapshot_kimg = cur_nimg / 1000
                next_snapshot = (cur_nimg // snapshot_nimg + 1) * snapshot_nimg
        if bar is not None:
            bar.close()

        # Outputs (rank 0): losses, samples, summary, checkpoint; then the resume state goes.
        seconds = time.time() - stage_start_time
        total_kimg = prev_total_kimg + cur_nimg / 1000
        info = {"res_px": res, "kimg": cur_nimg / 1000, "total_kimg": total_kimg, "seconds": seconds,
                "img_per_s": (cur_nimg - (resumed_kimg or 0) * 1000) / max(seconds - seconds_before, 1e-9),
                "final": {k: rows[-1][k] for k in STAT_KEYS} if rows else {},
                "skipped_steps": {k: int(sum(r.get(k, 0) for r in rows)) for k in SKIP_KEYS},
                "alpha": alpha, "ticks": len(rows), "gpus": env.world, "device": device.type,
                "resumed_from_kimg": resumed_kimg, "grown_keys": len(nets.grown_keys)}
        if env.is_main:
            write_text(paths.losses_tsv(res), losses_tsv_text(rows))
            with torch.no_grad(), autocast():
                fakes = torch.cat([nets.G_ema(z.to(device), alpha) for z in z_grid.split(sched.batch)])
            save_grid(paths.samples_png(res), fakes)
            write_json(paths.train_json(res), info)
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


def _out_of_memory(err, res: int, sched, step_nimg: int, phase: str, resume_path: Path,
                   snapshot_kimg: float | None) -> ProganError:
    """CUDA OOM in a training step: lower train.stages.<res>.batch. A snapshot resumes only with the batch it was
    made with (_snapshot_key), so the message says the stage then restarts from the previous checkpoint."""
    start = paths.checkpoint(res // 2) if res > 4 else "scratch"
    if snapshot_kimg is None:
        kept = f"no snapshot yet; the stage restarts from {start}" + (", which is untouched" if res > 4 else "")
    else:
        kept = (f"the snapshot {resume_path} (stage kimg {snapshot_kimg:.3f}) is kept, but it resumes only with "
                f"batch {sched.batch}: with a lower batch the stage restarts from {start}")
    return out_of_memory_error(err, f"train {res} px at stage kimg {step_nimg / 1000:.3f} ({phase})",
                               f"train.stages.{res}.batch", sched.batch, f"progan train --res {res}", kept)


def _stage_params(params, res: int) -> dict:
    """The params this stage ran with: exactly the keys it declares to Snakemake and DVC (pipeline.py), so a
    change to another key (say evaluate.num_images) cannot change the checkpoint's bytes and re-run what follows."""
    from progan import pipeline

    return params.subset(pipeline.stage(params, "train", res).params)


def _write_snapshot(path: Path, nets: Nets, opt_G, opt_D, cur_nimg: int, rows: list, seconds: float, key: dict,
                    params, sampler: data.Sampler, env: dist.DistEnv) -> bool:
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
