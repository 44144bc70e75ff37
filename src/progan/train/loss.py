"""ProGAN losses: WGAN-GP with the drift term (paper §A.1 / official tkarras `loss.py`) and the LSGAN variant.

- wgan-gp: official `loss.py` `G_wgan_acgan` / `D_wgangp_acgan` without labels: per-sample
  D loss = D(fake) - D(real) + gp_weight * (||grad D(x_hat)||_2 / f - 1)^2 + drift_weight * D(real)^2,
  x_hat = lerp(real, fake, u), u ~ U(0, 1) per sample (wgan_lambda 10, wgan_epsilon 0.001; loss.py L43-71);
  G loss = -D(fake). With a target t other than 1 (`train.gp_target`, official wgan_target, loss.py L46) the penalty
  is gp_weight / t^2 * (||grad|| / f - t)^2 (loss.py L66-67; Theano train.py@2609d1f L340 iwass_target: 750 in the
  paper's CIFAR-10 config, config.py L177). train.py minimises the mean over the minibatch (`tf.reduce_mean(D_loss)`,
  train.py L189-190), as here.
- the penalty's resolution factor f (`train.gp_resolution`, see `penalty_resolution_factor`): the official
  networks are built at the dataset resolution N. At stage R the reals are nearest-upscaled by f = N / R
  (train.py L74-79 UpscaleLOD; Theano train.py L227-229), G's output is nearest-upscaled by f (networks.py L221),
  and D first box-downscales its input by f (networks.py L98-103 downscale2d, L301-308 D_paper `grow`;
  Theano network.py D_paper `Downscale2DLayer`). D's score is the same as ours on the R px images, but the
  gradient is taken w.r.t. the upscaled mix (loss.py L63; Theano train.py L337): box_f^T spreads each native
  gradient value over f^2 pixels with weight 1/f^2, so its norm is ||grad_native|| / f. `dataset` (default)
  reproduces that by dividing our norm by f, no upscaled images needed; `native` (f = 1) penalises the R px
  gradient itself, as most re-implementations do.
- lsgan: the official TF release has no LSGAN; the only official one is the original Theano `train.py`
  `evaluate_loss(type='lsgan')`, which we follow exactly: reals are pushed to 0 and fakes to 1 with
  L2_fake_weight 0.1, D loss = mean(D(real)^2) + 0.1 * mean((D(fake) - 1)^2), G loss = mean(D(fake)^2).

Scores are cast to (at least) fp32 before any reduction (official `fp32(...)`), so the losses are safe under
bf16 autocast.
`fakes` are detached in the D loss: the D step never back-propagates into G.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from progan.errors import ProganError

KINDS = ("wgan-gp", "lsgan")
WGAN_TARGET = 1.0         # official wgan_target (loss.py L46): the gradient norm the penalty pulls towards
LSGAN_FAKE_WEIGHT = 0.1   # official Theano train.py evaluate_loss L2_fake_weight

Critic = Callable[..., Tensor]   # D(x, alpha, parts=1) -> [N] scores (parts: Discriminator.forward)


def _fp32(t: Tensor) -> Tensor:
    """At least fp32 (official `fp32(...)` casts scores; float64 stays float64 for exact tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ProganError(f"train.loss must be one of {', '.join(KINDS)}, got {kind!r}")


GP_RESOLUTIONS = ("dataset", "native")


def penalty_resolution_factor(gp_resolution: str, dataset_px: int, res_px: int) -> float:
    """f for `gradient_penalty`: dataset_px / res_px (`dataset`, official) or 1 (`native`)."""
    if gp_resolution not in GP_RESOLUTIONS:
        raise ProganError(f"train.gp_resolution must be one of {', '.join(GP_RESOLUTIONS)}, got {gp_resolution!r}")
    if gp_resolution == "native":
        return 1.0
    if res_px < 1 or dataset_px < res_px or dataset_px % res_px:
        raise ProganError(f"gradient penalty: dataset resolution {dataset_px} px is not a multiple of the stage's "
                          f"{res_px} px")
    return float(dataset_px // res_px)


def gradient_penalty(D: Critic, reals: Tensor, fakes: Tensor, alpha, *, mix: Tensor | None = None,
                     resolution_factor: float = 1.0, target: float = WGAN_TARGET) -> Tensor:
    """Mean over samples of (||grad_x D(x_hat)||_2 / f - t)^2 / t^2 with x_hat = lerp(reals, fakes, u) (official
    `D_wgangp_acgan` GradientPenalty, loss.py L57-67: square(norms - wgan_target) * wgan_lambda / wgan_target^2, the
    lambda applied by d_loss), f = `resolution_factor` (module docstring: the official gradient w.r.t. the f-times
    upscaled image has norm ||grad|| / f) and t = `target`. One uniform factor u per sample from the
    global torch RNG, or `mix` ([N] or [N, 1, 1, 1]) when given. create_graph=True so the penalty is trained."""
    n = reals.shape[0]
    if fakes.shape != reals.shape:
        raise ProganError(f"gradient penalty: reals {list(reals.shape)} and fakes {list(fakes.shape)} "
                          f"differ in shape")
    if mix is None:
        mix = torch.rand(n, 1, 1, 1, device=reals.device, dtype=torch.float32)
    mix = mix.reshape(n, 1, 1, 1).to(device=reals.device, dtype=reals.dtype)
    x_hat = torch.lerp(reals.detach(), fakes.detach().to(reals.dtype), mix).requires_grad_(True)
    scores = _fp32(D(x_hat, alpha))                                    # [N]
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    norms = _fp32(grad).square().sum(dim=tuple(range(1, grad.ndim))).sqrt()   # [N]
    if resolution_factor != 1.0:
        norms = norms / resolution_factor                              # = the official upscaled-image norm
    if target == WGAN_TARGET:
        return (norms - WGAN_TARGET).square().mean()
    return (norms - target).square().mean() / target**2


def scores_in_one_pass(D: Critic, alpha, *batches: Tensor) -> list[Tensor]:
    """D's scores of several equal-size minibatches from ONE call, fp32 [N] each: the batches are concatenated
    along dim 0 and D computes its minibatch stddev within each of them (`parts`, layers.minibatch_stddev), every
    other layer being per sample, so each result is D on that batch alone up to float summation order. One
    pass over 2N images costs less than two over N (bigger GEMMs; fewer weight scalings and kernel launches).
    Batches are cast to the first one's dtype (fakes from G under bf16 autocast: exact in fp32) and laid out
    like it (channels_last)."""
    first = batches[0]
    layout = torch.channels_last if first.ndim == 4 and first.is_contiguous(
        memory_format=torch.channels_last) and not first.is_contiguous() else torch.contiguous_format
    x = torch.cat([b.to(first.dtype) for b in batches]).contiguous(memory_format=layout)
    return list(_fp32(D(x, alpha, parts=len(batches))).chunk(len(batches)))


def d_loss(D: Critic, reals: Tensor, fakes: Tensor, alpha, kind: str = "wgan-gp", gp_weight: float = 10.0,
           drift_weight: float = 0.001, gp_resolution_factor: float = 1.0, *,
           mix: Tensor | None = None, gp_target: float = WGAN_TARGET) -> tuple[Tensor, dict[str, Tensor]]:
    """The D loss (scalar) and detached parts: d_real / d_fake (mean scores), gp (unweighted mean penalty, divided
    by gp_target^2: `gradient_penalty`),
    drift (unweighted mean D(real)^2). For lsgan, gp and drift are 0; for gp_weight 0 the penalty is skipped
    and reported as 0. `mix`: the penalty's interpolation factors (`gradient_penalty`).

    Reals and fakes are scored in one pass (`scores_in_one_pass`: minibatch stddev groups never mix them), the
    penalty's mixed images in a second one. Folding the mixed images into the same pass was measured and is
    slower (the D step alone, timed by hand while writing issue #17, paper nets, batch 16, 2 CPU threads: 0.95x at
    4 px, 1.0x at 8 px, 0.75x at 16 px of the three-pass D step, against 1.2x / 1.28x / 1.08x for this one; the
    whole step: README "Training step"): the penalty differentiates D w.r.t. its input
    with create_graph, and in a joint pass that first-order backward and its double backward run over all 3N
    rows, two thirds of them zeros, which costs more than the one forward call saved.
    The drift term needs no resolution factor: it is D's score, which the official upscaling leaves unchanged
    (loss.py L69-71 `tf.square(real_scores_out)`; Theano train.py L341)."""
    _check_kind(kind)
    real_scores, fake_scores = scores_in_one_pass(D, alpha, reals, fakes.detach())   # [N], [N]
    zero = real_scores.new_zeros(())
    if kind == "wgan-gp":
        drift = real_scores.square().mean()
        gp = (gradient_penalty(D, reals, fakes, alpha, mix=mix, resolution_factor=gp_resolution_factor,
                               target=gp_target) if gp_weight > 0 else zero)
        loss = fake_scores.mean() - real_scores.mean() + gp_weight * gp + drift_weight * drift
    else:
        drift = gp = zero
        loss = real_scores.square().mean() + LSGAN_FAKE_WEIGHT * (fake_scores - 1.0).square().mean()
    parts = {"d_real": real_scores.mean().detach(), "d_fake": fake_scores.mean().detach(),
             "gp": gp.detach(), "drift": drift.detach()}
    return loss, parts


def g_loss(D: Critic, fakes: Tensor, alpha, kind: str = "wgan-gp") -> Tensor:
    """The G loss (scalar): wgan-gp -mean(D(fake)) (official G_wgan_acgan); lsgan mean(D(fake)^2) (Theano)."""
    _check_kind(kind)
    fake_scores = _fp32(D(fakes, alpha))                               # [N]
    if kind == "wgan-gp":
        return -fake_scores.mean()
    return fake_scores.square().mean()
