"""One training step of ProGAN: what a minibatch draws, its inputs, one D step, one G step and the G_ema update.

Every random draw of a step is a pure function of (seed, R, cur_nimg) (`latents`, `gp_mix`; the data order and
flips are data.py's), so a resumed or multi-GPU run draws exactly what a single uninterrupted one does: each rank
keeps rows rank::world of the global minibatch. `train_step` takes its inputs as one `StepInputs` and its knobs as
one `Settings`, and returns the step's statistics without a host sync. A D or G update whose gradients are not all
finite is skipped (official tfutil.py L346-355, nonfinite.step_if_finite).
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from progan.model.networks import fade_reals
from progan.train import data, dist
from progan.train.loss import d_loss, g_loss
from progan.train.nonfinite import SKIP_KEYS, STAT_KEYS, step_if_finite

if TYPE_CHECKING:
    from progan.train.nets import Nets

STEP_STATS = STAT_KEYS + SKIP_KEYS     # what train_step returns, in this order (nonfinite.TickStats sums them)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (numpy SeedSequence): init, latents and per-rank RNGs never collide."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def latents(seed: int, res_px: int, cur_nimg: int, which: int, batch: int, dim: int) -> torch.Tensor:
    """Global minibatch of latents [batch, dim] (CPU) as a pure function of cur_nimg: resumable, and the same
    on every rank (each keeps rows rank::world). which: 2 = D step, 3 = G step."""
    g = torch.Generator().manual_seed(derive_seed(seed, res_px, which, cur_nimg))
    return torch.randn(batch, dim, generator=g)


def gp_mix(seed: int, res_px: int, cur_nimg: int, batch: int) -> torch.Tensor:
    """Gradient-penalty interpolation factors u ~ U(0, 1) [batch] of the global minibatch (official
    D_wgangp_acgan mixing_factors), a pure function of cur_nimg like `latents`."""
    g = torch.Generator().manual_seed(derive_seed(seed, res_px, 5, cur_nimg))
    return torch.rand(batch, generator=g)


def fixed_latents(seed: int, count: int, dim: int) -> torch.Tensor:
    """The sample-grid latents [count, dim] (report.grid_images of them): seeded by params.seed alone, the same
    every stage."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(int(count), dim, generator=g)


class Settings(NamedTuple):
    """The train.* knobs a step uses (params.yaml, read once by the loop)."""
    loss: str                      # wgan-gp | lsgan
    gp_weight: float               # WGAN-GP lambda
    drift_weight: float            # epsilon_drift
    ema_decay: float               # G_ema <- G + decay * (G_ema - G)
    gp_resolution_factor: float = 1.0   # the penalty's norm is divided by it (loss.penalty_resolution_factor)
    gp_target: float = 1.0         # the penalty's target norm (official wgan_target; loss.gradient_penalty)


class StepInputs(NamedTuple):
    """This rank's rows of one global minibatch, on the device."""
    reals: torch.Tensor            # [n, 3, R, R] in [-1, 1], mirrored and faded (official process_reals)
    z_d: torch.Tensor              # [n, latent_dim] latents of the D step
    z_g: torch.Tensor              # [n, latent_dim] latents of the G step
    mix: torch.Tensor              # [n] gradient-penalty interpolation factors u ~ U(0, 1)
    alpha: float                   # fade-in weight of the new layers (1 once stabilising)


def step_inputs(seed: int, res: int, batch: int, step_nimg: int, x_u8: torch.Tensor, flip: torch.Tensor,
                alpha: float, latent_dim: int, device: torch.device, channels_last: bool = False, rank: int = 0,
                world: int = 1) -> StepInputs:
    """The StepInputs of this rank for the global minibatch at step_nimg: reals from the uint8 batch (official
    process_reals: [-1, 1], mirror, FadeLOD above 4 px), latents and penalty factors drawn from step_nimg, their
    rows rank::world, copied without a host sync (data.host_to_device)."""
    reals = data.to_device(x_u8, flip, device, channels_last)            # [n, 3, R, R] in [-1, 1]
    if res > 4:
        reals = fade_reals(reals, alpha)                                  # official process_reals FadeLOD
    z_d, z_g = (data.host_to_device(latents(seed, res, step_nimg, which, batch, latent_dim)[rank::world], device)
                for which in (2, 3))
    mix = data.host_to_device(gp_mix(seed, res, step_nimg, batch)[rank::world], device)
    return StepInputs(reals, z_d, z_g, mix, alpha)


def train_step(nets: "Nets", opt_G, opt_D, inputs: StepInputs, settings: Settings, world: int,
               autocast=contextlib.nullcontext, g_step: bool = True) -> torch.Tensor:
    """One D step then, with `g_step`, one G step and the EMA update (train.d_repeats k: the loop asks for the G step
    after every k-th D step, official D_repeats, train.py L228-231; the EMA follows the G step, as Theano
    train.py@2609d1f L248-251). A step with non-finite gradients is skipped (`step_if_finite`).

    Returns the detached stats [d_loss, g_loss, gp, d_real, d_fake, d_skipped, g_skipped] (STEP_STATS; no host sync);
    without the G step g_loss and g_skipped are 0 (nonfinite.TickStats.add leaves them out).
    """
    G, D = nets.G, nets.D
    reals, z_d, z_g, mix, alpha = inputs
    # D step: fakes from G without graph; the WGAN-GP loss with drift (loss.d_loss: reals and fakes scored in one
    # pass, the penalty's mixed images in a second). The penalty uses our own `mix` (drawn from cur_nimg like the
    # latents) rather than the global RNG, so that k GPUs compute exactly the single-GPU minibatch and a resumed
    # run needs no RNG state.
    # These fakes and the G step's come from the same G (only D is updated in between), but one G pass over
    # [z_d; z_g] with a graph is slower: its backward then runs over 2N rows, half of them zero gradients (measured
    # for issue #17, bench_train's interleaved rounds, 1 thread, load 3.9-4.7: 0.98x / 0.97x / 0.92x of this step,
    # tiny nets 32 px, paper nets 4 / 8 px). The data path (step_inputs) and the EMA (one fused call) are 0.1-1.1%
    # of the step, with nothing to fold.
    D.requires_grad_(True)
    with torch.no_grad(), autocast():
        fakes = G(z_d, alpha)
    with autocast():
        loss_D, parts = d_loss(D, reals, fakes, alpha, settings.loss, settings.gp_weight, settings.drift_weight,
                               settings.gp_resolution_factor, mix=mix, gp_target=settings.gp_target)
    opt_D.zero_grad(set_to_none=True)
    loss_D.backward()
    dist.average_gradients(list(D.parameters()), world)
    d_skipped = step_if_finite(opt_D)
    dtype = torch.promote_types(loss_D.dtype, torch.float32)         # fp32 (fp64 nets in the tests: fp64)
    if not g_step:
        zero = torch.zeros((), device=loss_D.device, dtype=dtype)
        return torch.stack([loss_D.detach().to(dtype), zero, *(parts[k].to(dtype) for k in ("gp", "d_real", "d_fake")),
                            d_skipped.to(loss_D.device, dtype), zero])
    # G step with fresh latents; D's weights frozen so no D gradients are computed.
    D.requires_grad_(False)
    with autocast():
        loss_G = g_loss(D, G(z_g, alpha), alpha, settings.loss)
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    dist.average_gradients(list(G.parameters()), world)
    g_skipped = step_if_finite(opt_G)
    ema_update(nets.G_ema, G, settings.ema_decay)      # also after a skipped G step, as official Gs_update_op
    return torch.stack([loss_D.detach(), loss_G.detach(), *(parts[k] for k in ("gp", "d_real", "d_fake")),
                        d_skipped.to(loss_D.device), g_skipped.to(loss_D.device)]).to(dtype)


@torch.no_grad()
def ema_update(G_ema: torch.nn.Module, G: torch.nn.Module, decay: float) -> None:
    """G_ema <- G + decay * (G_ema - G) for every parameter in one fused call (official Gs.setup_as_moving_average_of
    with beta = G_smoothing); buffers are copied."""
    ema_p = [p for p in G_ema.parameters()]
    g_p = [p.detach() for p in G.parameters()]
    torch._foreach_lerp_(ema_p, g_p, 1.0 - decay)
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        b_ema.copy_(b)
