"""The training step as it was before issue #17, kept as the reference the one-pass step is checked against
(tests/test_step.py) and timed against (bench/bench_train.py).

The critic runs three times per D step, on reals, fakes and the penalty's mixed images separately, as the official
code does (loss.py D_wgangp_acgan: `real_scores_out = fp32(D.get_output_for(reals, ...))`, `fake_scores_out =
...(fakes ...)`, `mixed_scores_out = ...(mixed_images_out ...)`), then once on fresh fakes in the G step. Copied
from train/step.py and train/loss.py at main b1cf58f (`train_step`, `d_loss`), cut down to the branches train_step
took (d_loss with gp_weight 0), the arithmetic unchanged; the penalty and the G loss, which #17 left as they were,
are progan.train.loss's own; one change: the stats keep float64 when the nets are float64 (main cast them to float32), so the
float64 equality test can compare losses to 1e-10. `train_step` also runs the fused up/down convs' 4x4 kernels
built as main built them (`main_fused_kernels`: pad + four shifted slices + sums, where layers.py now does one GEMM).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from progan.model import layers

from progan.train import dist
from progan.train.loss import LSGAN_FAKE_WEIGHT, _fp32, g_loss, gradient_penalty   # unchanged by #17: shared
from progan.train.nonfinite import step_if_finite
from progan.train.step import ema_update


def d_loss(D, reals, fakes, alpha, kind, drift_weight):
    """The D loss without the penalty: D called on reals and fakes separately."""
    fakes = fakes.detach()
    real_scores = _fp32(D(reals, alpha))                               # [N]
    fake_scores = _fp32(D(fakes, alpha))                               # [N]
    zero = real_scores.new_zeros(())
    if kind == "wgan-gp":
        drift = real_scores.square().mean()
        loss = fake_scores.mean() - real_scores.mean() + 0.0 * zero + drift_weight * drift
    else:
        loss = real_scores.square().mean() + LSGAN_FAKE_WEIGHT * (fake_scores - 1.0).square().mean()
    return loss, {"d_real": real_scores.mean().detach(), "d_fake": fake_scores.mean().detach()}


def _up_forward(self, x):            # main's layers.UpConv2d.forward
    w = (self.weight * self.scale).flip(2, 3).transpose(0, 1)   # [in, out, 3, 3] (conv_transpose layout)
    w = F.pad(w, (1, 1, 1, 1))                                   # [in, out, 5, 5]
    w = w[:, :, 1:, 1:] + w[:, :, :-1, 1:] + w[:, :, 1:, :-1] + w[:, :, :-1, :-1]  # [in, out, 4, 4]
    return F.conv_transpose2d(x, w, self.bias, stride=2, padding=1)


def _down_forward(self, x):          # main's layers.ConvDown2d.forward
    w = F.pad(self.weight * self.scale, (1, 1, 1, 1))           # [out, in, 5, 5]
    w = (w[:, :, 1:, 1:] + w[:, :, :-1, 1:] + w[:, :, 1:, :-1] + w[:, :, :-1, :-1]) * 0.25  # [out, in, 4, 4]
    return F.conv2d(x, w, self.bias, stride=2, padding=1)


@contextlib.contextmanager
def main_fused_kernels():
    """UpConv2d / ConvDown2d build their 4x4 kernels as main did, inside the block (the classes are patched)."""
    saved = layers.UpConv2d.forward, layers.ConvDown2d.forward
    layers.UpConv2d.forward, layers.ConvDown2d.forward = _up_forward, _down_forward
    try:
        yield
    finally:
        layers.UpConv2d.forward, layers.ConvDown2d.forward = saved


def train_step(nets, opt_G, opt_D, inputs, settings, world, autocast=contextlib.nullcontext) -> torch.Tensor:
    """main's train_step: [d_loss, g_loss, gp, d_real, d_fake, d_skipped, g_skipped]."""
    with main_fused_kernels():
        return _train_step(nets, opt_G, opt_D, inputs, settings, world, autocast)



def _train_step(nets, opt_G, opt_D, inputs, settings, world, autocast):
    G, D = nets.G, nets.D
    reals, z_d, z_g, mix, alpha = inputs
    D.requires_grad_(True)
    with torch.no_grad(), autocast():
        fakes = G(z_d, alpha)
    use_gp = settings.loss == "wgan-gp" and settings.gp_weight > 0
    with autocast():
        loss_D, parts = d_loss(D, reals, fakes, alpha, settings.loss, settings.drift_weight)
        if use_gp:
            gp = gradient_penalty(D, reals, fakes, alpha, mix=mix, resolution_factor=settings.gp_resolution_factor)
            loss_D = loss_D + settings.gp_weight * gp
            parts = {**parts, "gp": gp.detach()}
    opt_D.zero_grad(set_to_none=True)
    loss_D.backward()
    dist.average_gradients(list(D.parameters()), world)
    d_skipped = step_if_finite(opt_D)
    D.requires_grad_(False)
    with autocast():
        loss_G = g_loss(D, G(z_g, alpha), alpha, settings.loss)
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    dist.average_gradients(list(G.parameters()), world)
    g_skipped = step_if_finite(opt_G)
    ema_update(nets.G_ema, G, settings.ema_decay)
    zero = loss_D.detach().new_zeros(())
    dtype = torch.promote_types(loss_D.dtype, torch.float32)
    return torch.stack([loss_D.detach().to(dtype), loss_G.detach().to(dtype),
                        *[parts.get(k, zero).detach().to(dtype).mean() for k in ("gp", "d_real", "d_fake")],
                        d_skipped.to(zero.device, dtype), g_skipped.to(zero.device, dtype)])
