"""WGAN-GP / LSGAN losses against hand-computed values (official loss.py D_wgangp_acgan, Theano lsgan)."""
import math

import pytest
import torch
from torch import nn

from progan.errors import ProganError
from progan.model import Discriminator, Generator, ModelConfig
from progan.train.loss import d_loss, g_loss, gradient_penalty


class SumCritic(nn.Module):
    """D(x) = c * sum(x) per sample: grad_x = c everywhere, ||grad|| = c * sqrt(numel)."""

    def __init__(self, c: float):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c, dtype=torch.float64))
        self.alphas = []

    def forward(self, x, alpha=1.0):
        self.alphas.append(alpha)
        return self.c * x.flatten(1).sum(1)


def test_gradient_penalty_of_a_linear_critic():
    reals = torch.randn(4, 3, 4, 4, dtype=torch.float64)            # 48 values per sample
    fakes = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    D = SumCritic(0.5)
    gp = gradient_penalty(D, reals, fakes, 0.7)
    assert gp.item() == pytest.approx((0.5 * math.sqrt(48) - 1) ** 2, rel=1e-12)   # = 6.0718...
    assert D.alphas == [0.7]
    assert gradient_penalty(SumCritic(1 / math.sqrt(48)), reals, fakes, 1.0).item() == pytest.approx(0, abs=1e-12)


def test_gradient_penalty_trains_through_create_graph():
    D = SumCritic(0.5)
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)                 # numel 4: ||grad|| = 2c
    gp = gradient_penalty(D, x, x, 1.0)
    gp.backward()
    # d/dc (2c - 1)^2 = 4 (2c - 1) = 0 at c = 0.5; use c = 1: (2 - 1)^2 = 1, derivative 4
    assert D.c.grad.item() == pytest.approx(0.0, abs=1e-12)
    D = SumCritic(1.0)
    gradient_penalty(D, x, x, 1.0).backward()
    assert D.c.grad.item() == pytest.approx(4.0, rel=1e-12)


def test_gradient_penalty_mixes_reals_to_fakes_per_sample():
    # D(x) = 0.5 * sum(x^2): grad = x_hat = lerp(real, fake, u) = u * k for reals 0, fakes k.
    def D(x, alpha):
        return 0.5 * x.flatten(1).square().sum(1)
    reals = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    fakes = torch.full((2, 1, 2, 2), 3.0, dtype=torch.float64)
    mix = torch.tensor([0.25, 1.0], dtype=torch.float64)
    norms = torch.tensor([0.25 * 3 * 2, 1.0 * 3 * 2])             # u * k * sqrt(4)
    expected = ((norms - 1) ** 2).mean().item()                    # (0.5^2 + 5^2) / 2 = 12.625
    assert gradient_penalty(D, reals, fakes, 1.0, mix=mix).item() == pytest.approx(expected, rel=1e-12)
    assert expected == 12.625
    torch.manual_seed(0)
    u = torch.rand(2, 1, 1, 1)                                     # the default draws one U(0,1) per sample
    torch.manual_seed(0)
    by_default = gradient_penalty(D, reals, fakes, 1.0)
    assert by_default.item() == pytest.approx(((u.flatten().double() * 6 - 1) ** 2).mean().item(), rel=1e-6)


def test_d_loss_and_g_loss_hand_values():
    # D(x) = 0.25 * sum(x) with 4 values per sample; reals all 2 -> D = 2, fakes all -1 -> D = -1
    D = SumCritic(0.25)
    reals = torch.full((3, 1, 2, 2), 2.0, dtype=torch.float64)
    fakes = torch.full((3, 1, 2, 2), -1.0, dtype=torch.float64)
    loss, parts = d_loss(D, reals, fakes, 0.5)
    gp = (0.25 * 2 - 1) ** 2                                        # ||grad|| = 0.25 * sqrt(4) = 0.5 -> 0.25
    assert parts["d_real"].item() == 2.0 and parts["d_fake"].item() == -1.0
    assert parts["gp"].item() == pytest.approx(gp) and parts["drift"].item() == 4.0
    assert loss.item() == pytest.approx(-1 - 2 + 10 * 0.25 + 0.001 * 4)   # = -0.496
    assert all(not p.requires_grad for p in parts.values())
    assert set(D.alphas) == {0.5}
    loss, parts = d_loss(D, reals, fakes, 0.5, gp_weight=2.0, drift_weight=0.5)
    assert loss.item() == pytest.approx(-1 - 2 + 2 * 0.25 + 0.5 * 4)
    loss, parts = d_loss(D, reals, fakes, 0.5, gp_weight=0.0)
    assert parts["gp"].item() == 0 and loss.item() == pytest.approx(-3 + 0.004)
    assert g_loss(D, fakes, 0.5).item() == 1.0                      # -mean(D(fake))
    # lsgan (official Theano train.py): reals -> 0, fakes -> 1 weighted 0.1; G pushes fakes -> 0
    loss, parts = d_loss(D, reals, fakes, 0.5, kind="lsgan")
    assert loss.item() == pytest.approx(2.0**2 + 0.1 * (-1 - 1) ** 2)     # = 4.4
    assert parts["gp"].item() == 0 and parts["drift"].item() == 0
    assert g_loss(D, fakes, 0.5, kind="lsgan").item() == 1.0


def test_unknown_loss_kind():
    D = SumCritic(1.0)
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    with pytest.raises(ProganError, match="train.loss"):
        d_loss(D, x, x, 1.0, kind="hinge")
    with pytest.raises(ProganError, match="train.loss"):
        g_loss(D, x, 1.0, kind="hinge")


def test_losses_on_the_real_networks_train_only_their_side():
    cfg = ModelConfig(latent_dim=16, fmap_base=64, fmap_max=16, mbstd_group_size=4)
    torch.manual_seed(0)
    G, D = Generator(cfg, 8), Discriminator(cfg, 8)
    reals = torch.randn(8, 3, 8, 8)
    fakes = G(torch.randn(8, 16), 0.5)
    loss, parts = d_loss(D, reals, fakes, 0.5)
    expected = parts["d_fake"] - parts["d_real"] + 10 * parts["gp"] + 0.001 * parts["drift"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in G.parameters())              # fakes are detached in the D step
    assert D.blocks["8"].conv0.weight.grad is not None and D.from_rgb["8"].weight.grad is not None
    assert D.from_rgb["4"].weight.grad is not None                  # the fading-out branch trains too
    D.zero_grad(set_to_none=True)
    g_loss(D, fakes, 0.5).backward()
    assert G.blocks["8"].conv1.weight.grad is not None and torch.isfinite(G.blocks["4"].dense.weight.grad).all()
