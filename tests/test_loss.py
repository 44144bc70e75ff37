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
        self.alphas, self.calls = [], []

    def forward(self, x, alpha=1.0, parts=1):
        self.alphas.append(alpha)
        self.calls.append((x.shape[0], parts))
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
    assert D.calls == [(6, 2), (3, 1)]          # reals and fakes in one pass of 2 parts, then the mixed images
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


# ---------------------------------------------------------------------------------------------- gp_resolution

def _official_upscale(x: torch.Tensor, f: int) -> torch.Tensor:
    """Nearest upscale by f exactly as the official code writes it (train.py L74-79 UpscaleLOD, networks.py
    upscale2d L72-80): reshape to [N, C, H, 1, W, 1], tile f x f, reshape to [N, C, H*f, W*f]."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h, 1, w, 1).expand(n, c, h, f, w, f).reshape(n, c, h * f, w * f)


def _official_penalty(D, reals, fakes, alpha, mix, f):
    """The official penalty at stage R of an N = R * f px network (loss.py L57-67 on the upscaled images):
    reals and fakes nearest-upscaled to N px, D_official = our D behind a box downscale by f (networks.py
    downscale2d L98-103 = avg_pool with ksize = strides = f, D_paper `grow` L303: fromrgb(downscale2d(images_in,
    2**lod))), the mix and autograd on the N px images."""
    def D_official(x_full):
        return D(torch.nn.functional.avg_pool2d(x_full, f) if f > 1 else x_full, alpha)
    reals_up, fakes_up = _official_upscale(reals, f), _official_upscale(fakes, f)
    mixed = (reals_up + (fakes_up - reals_up) * mix.reshape(-1, 1, 1, 1)).requires_grad_(True)   # tfutil.lerp
    scores = D_official(mixed)
    (grads,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    norms = grads.square().sum(dim=(1, 2, 3)).sqrt()
    return (norms - 1.0).square().mean(), D_official(reals_up)


@pytest.mark.parametrize("res, f, alpha", [(32, 1, 1.0), (16, 2, 1.0), (8, 8, 0.3), (4, 32, 1.0)])
def test_penalty_at_the_dataset_resolution_equals_the_official_upscaled_construction(res, f, alpha):
    """Our cheap version (the R px gradient norm divided by f) equals the official penalty computed on the real
    f-times upscaled images to 1e-6, for f = 1, 2, 8, 32 (a 32 px and a 128 px run); D's scores (and so the
    drift term) are the same on the upscaled images as on ours."""
    cfg = ModelConfig(latent_dim=16, fmap_base=64, fmap_max=16, mbstd_group_size=4)
    torch.manual_seed(res)
    G, D = Generator(cfg, res).double(), Discriminator(cfg, res).double()
    reals = torch.rand(8, 3, res, res, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        fakes = G(torch.randn(8, 16, dtype=torch.float64), alpha)
    mix = torch.rand(8, dtype=torch.float64)
    official, official_real_scores = _official_penalty(D, reals, fakes, alpha, mix, f)
    ours = gradient_penalty(D, reals, fakes, alpha, mix=mix, resolution_factor=float(f))
    assert ours.item() == pytest.approx(official.item(), rel=1e-6, abs=1e-9)
    assert torch.allclose(official_real_scores, D(reals, alpha), rtol=1e-12, atol=1e-12)   # drift unchanged
    if f > 1:                                   # and it is not the native penalty: the norm really is / f
        native = gradient_penalty(D, reals, fakes, alpha, mix=mix)
        assert abs(native.item() - official.item()) > 1e-3 * max(1.0, official.item())
    # the penalty's own gradient (what trains D) agrees too
    g_ours = torch.autograd.grad(ours, list(D.parameters()), allow_unused=True)
    g_off = torch.autograd.grad(_official_penalty(D, reals, fakes, alpha, mix, f)[0], list(D.parameters()),
                                allow_unused=True)
    for a, b in zip(g_ours, g_off):
        if a is not None or b is not None:
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def test_penalty_resolution_factor_and_d_loss():
    from progan.train.loss import penalty_resolution_factor
    assert penalty_resolution_factor("dataset", 128, 4) == 32.0
    assert penalty_resolution_factor("dataset", 128, 128) == 1.0
    assert penalty_resolution_factor("native", 128, 4) == 1.0
    with pytest.raises(ProganError, match="train.gp_resolution"):
        penalty_resolution_factor("full", 128, 4)
    # d_loss passes the factor to the penalty: ||grad|| = 0.5 * sqrt(4) = 1 natively, 1 / 4 with f = 4
    D = SumCritic(0.5)
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    assert d_loss(D, x, x, 1.0)[1]["gp"].item() == pytest.approx(0.0, abs=1e-12)
    assert d_loss(D, x, x, 1.0, gp_resolution_factor=4.0)[1]["gp"].item() == pytest.approx((0.25 - 1) ** 2)
