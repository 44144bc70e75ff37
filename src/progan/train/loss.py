"""ProGAN losses: WGAN-GP with the drift term (paper §A.1 / official tkarras `loss.py`) and the LSGAN variant.

- wgan-gp: official `loss.py` `G_wgan_acgan` / `D_wgangp_acgan` without labels: per-sample
  D loss = D(fake) - D(real) + gp_weight * (||grad D(x_hat)||_2 - 1)^2 + drift_weight * D(real)^2,
  x_hat = lerp(real, fake, u), u ~ U(0, 1) per sample (wgan_lambda 10, wgan_epsilon 0.001, wgan_target 1);
  G loss = -D(fake). train.py minimises the mean over the minibatch (`tf.reduce_mean(D_loss)`), as here.
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
WGAN_TARGET = 1.0         # official wgan_target: the gradient norm the penalty pulls towards
LSGAN_FAKE_WEIGHT = 0.1   # official Theano train.py evaluate_loss L2_fake_weight

Critic = Callable[[Tensor, "float | Tensor"], Tensor]   # D(x, alpha) -> [N] scores


def _fp32(t: Tensor) -> Tensor:
    """At least fp32 (official `fp32(...)` casts scores; float64 stays float64 for exact tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ProganError(f"train.loss must be one of {', '.join(KINDS)}, got {kind!r}")


def gradient_penalty(D: Critic, reals: Tensor, fakes: Tensor, alpha, *, mix: Tensor | None = None) -> Tensor:
    """Mean over samples of (||grad_x D(x_hat)||_2 - 1)^2 with x_hat = lerp(reals, fakes, u) (official
    `D_wgangp_acgan` GradientPenalty). One uniform factor u per sample from the global torch RNG, or `mix`
    ([N] or [N, 1, 1, 1]) when given. create_graph=True so the penalty itself is trained."""
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
    return (norms - WGAN_TARGET).square().mean()


def d_loss(D: Critic, reals: Tensor, fakes: Tensor, alpha, kind: str = "wgan-gp", gp_weight: float = 10.0,
           drift_weight: float = 0.001) -> tuple[Tensor, dict[str, Tensor]]:
    """The D loss (scalar) and detached parts: d_real / d_fake (mean scores), gp (unweighted mean penalty),
    drift (unweighted mean D(real)^2). For lsgan, gp and drift are 0; for gp_weight 0 the penalty is skipped
    and reported as 0. D is called on reals and fakes separately (minibatch stddev groups never mix them)."""
    _check_kind(kind)
    fakes = fakes.detach()
    real_scores = _fp32(D(reals, alpha))                               # [N]
    fake_scores = _fp32(D(fakes, alpha))                               # [N]
    zero = real_scores.new_zeros(())
    if kind == "wgan-gp":
        drift = real_scores.square().mean()
        gp = gradient_penalty(D, reals, fakes, alpha) if gp_weight > 0 else zero
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
