"""The training knobs of the paper's CIFAR-10 configuration (issue #29) against the official computations, rebuilt here:
the penalty target (TF loss.py L46, L66-67 wgan_target; Theano train.py@2609d1f L340 iwass_target), D repeats per G
step (TF train.py L227-231 D_repeats; Theano train.py L260-266 D_training_repeats), separate G and D learning rates
(TF G_lrate / D_lrate, train.py L125-126, L229-231) and the learning-rate ramp-up (Theano misc.py L79-85 rampup,
train.py L207-210)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from progan import params as params_mod
from progan.model import Discriminator, Generator, ModelConfig
from progan.train import loop, nonfinite, schedule, step
from progan.train.loss import d_loss, gradient_penalty

from test_loss import _official_upscale
from test_train import _stage, make_project, one_thread


# ---------------------------------------------------------------------------------------------- the penalty target

def _official_d_loss(D, reals, fakes, alpha, mix, f, wgan_lambda, wgan_epsilon, wgan_target):
    """TF loss.py D_wgangp_acgan L49-71 without labels, line by line, at the dataset resolution (reals and fakes
    nearest-upscaled by f, D behind a box downscale: test_loss._official_penalty), reduced as train.py L189-190."""
    def D_official(x_full):
        return D(torch.nn.functional.avg_pool2d(x_full, f) if f > 1 else x_full, alpha)
    reals_up, fakes_up = _official_upscale(reals, f), _official_upscale(fakes, f)
    real_scores_out, fake_scores_out = D_official(reals_up), D_official(fakes_up)
    loss = fake_scores_out - real_scores_out                                                   # L55
    mixed_images_out = (reals_up + (fakes_up - reals_up) * mix.reshape(-1, 1, 1, 1)).requires_grad_(True)  # L59
    mixed_scores_out = D_official(mixed_images_out)                                            # L60
    (mixed_grads,) = torch.autograd.grad(mixed_scores_out.sum(), mixed_images_out, create_graph=True)   # L62-63
    mixed_norms = mixed_grads.square().sum(dim=(1, 2, 3)).sqrt()                              # L64
    gradient_penalty = (mixed_norms - wgan_target).square()                                    # L66
    loss = loss + gradient_penalty * (wgan_lambda / (wgan_target ** 2))                        # L67
    loss = loss + real_scores_out.square() * wgan_epsilon                                      # L69-71
    return loss.mean()


@pytest.mark.parametrize("target, f", [(1.0, 1), (750.0, 1), (750.0, 4), (0.5, 2)])
def test_penalty_target_is_the_official_loss(target, f):
    """d_loss with train.gp_target t equals the official D loss with wgan_target t (and the Theano iwass_target form,
    mean(square(norms - t)) * lambda / t^2, which is the same sum), at the dataset resolution too, in float64."""
    cfg = ModelConfig(latent_dim=16, fmap_base=64, fmap_max=16, mbstd_group_size=4)
    torch.manual_seed(7)
    res = 8
    G, D = Generator(cfg, res).double(), Discriminator(cfg, res).double()
    reals = torch.rand(8, 3, res, res, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        fakes = G(torch.randn(8, 16, dtype=torch.float64), 0.6)
    mix = torch.rand(8, dtype=torch.float64)
    official = _official_d_loss(D, reals, fakes, 0.6, mix, f, 10.0, 0.001, target)
    ours, parts = d_loss(D, reals, fakes, 0.6, "wgan-gp", 10.0, 0.001, float(f), mix=mix, gp_target=target)
    assert ours.item() == pytest.approx(official.item(), rel=1e-10, abs=1e-12)
    # the unweighted penalty we report: mean((norm / f - t)^2) / t^2
    gp = gradient_penalty(D, reals, fakes, 0.6, mix=mix, resolution_factor=float(f), target=target)
    assert parts["gp"].item() == pytest.approx(gp.item(), rel=1e-12)
    # and its gradient, what trains D
    g_ours = torch.autograd.grad(ours, list(D.parameters()), allow_unused=True)
    g_off = torch.autograd.grad(_official_d_loss(D, reals, fakes, 0.6, mix, f, 10.0, 0.001, target),
                                list(D.parameters()), allow_unused=True)
    for a, b in zip(g_ours, g_off):
        if a is not None or b is not None:
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    if target != 1.0:                     # a one-character bug (t in place of t^2, or target ignored) would show
        plain = d_loss(D, reals, fakes, 0.6, "wgan-gp", 10.0, 0.001, float(f), mix=mix)[0]
        assert abs(plain.item() - official.item()) > 1e-6


# ---------------------------------------------------------------------------------------------- the lr ramp-up

def _theano_rampup(epoch, rampup_length):
    """misc.py@2609d1f L79-85, line by line."""
    if epoch < rampup_length:
        p = max(0.0, float(epoch)) / float(rampup_length)
        p = 1.0 - p
        return math.exp(-p * p * 5.0)
    else:
        return 1.0


def test_lr_rampup_is_the_theano_rampup():
    for rampup_kimg in (0, 0.05, 40):
        for kimg in np.linspace(0, 60, 241).tolist() + [0.001, 0.049, 39.999]:
            assert schedule.lr_rampup(kimg, rampup_kimg) == pytest.approx(_theano_rampup(kimg, rampup_kimg), abs=0), \
                (kimg, rampup_kimg)
    assert schedule.lr_rampup(0, 40) == pytest.approx(math.exp(-5))
    assert schedule.stage_lrs(0.001) == (0.001, 0.001)
    assert schedule.stage_lrs(params_mod.Section({"G": 0.002, "D": 0.001})) == (0.002, 0.001)


# ---------------------------------------------------------------------------------------------- TickStats

def test_tick_stats_leave_a_missing_g_step_out():
    stats = nonfinite.TickStats(torch.device("cpu"))
    #                         d_loss g_loss gp  d_real d_fake  d_skip g_skip
    stats.add(torch.tensor([1.0, 0.0, 0.1, 2.0, 3.0, 0.0, 0.0]), g_step=False)
    stats.add(torch.tensor([3.0, 5.0, 0.3, 4.0, 5.0, 0.0, 0.0]), g_step=True)
    stats.add(torch.tensor([5.0, 0.0, 0.5, 6.0, 7.0, 1.0, 0.0]), g_step=False)     # a skipped D step
    values, max_run = stats.read(1)
    assert values["d_loss"] == 2.0 and values["g_loss"] == 5.0          # g_loss over the one G step only
    assert values["skipped_d"] == 1 and values["skipped_g"] == 0 and max_run == 1


# ---------------------------------------------------------------------------------------------- in a training stage

def _official_theano_loop(total_nimg, batch, d_repeats, rampup_kimg, lr_G, lr_D):
    """Theano train.py@2609d1f L190-266 (separate_funcs): per G iteration the lr coefficient at its first image
    (L207-210), d_repeats D steps each on its own minibatch (L261-265), then one G step (L266). Returns
    [(nimg, lr_D, lr_G, g_step)] per D step; the G step goes with the group's last D step."""
    out, cur_nimg = [], 0
    while cur_nimg < total_nimg:
        coef = _theano_rampup(cur_nimg / 1000.0, rampup_kimg)
        group = []
        for _ in range(d_repeats):
            if cur_nimg >= total_nimg:        # ours: a stage ends on its last minibatch (README fidelity table)
                break
            group.append([cur_nimg, coef * lr_D, coef * lr_G, False])
            cur_nimg += batch
        group[-1][3] = True
        out += [tuple(g) for g in group]
    return out


def test_d_repeats_separate_lrs_and_rampup_in_a_stage(tmp_path, monkeypatch):
    """A real 4 px stage with train.d_repeats 3, lr {G: 0.002, D: 0.0005} and lr_rampup_kimg 0.2: every minibatch's
    D step runs at the official D learning rate of its G iteration, a G step follows every third D step (and the
    stage's last), G changes only then, and D at every step."""
    path = make_project(tmp_path, stages={"4": {"batch": 8, "lr": {"G": 0.002, "D": 0.0005}, "transition_kimg": 0,
                                                "stabilize_kimg": 0.1}, "8": _stage(8, 0.05, 0.05)},
                        train__d_repeats=3, train__lr_rampup_kimg=0.2,
                        mlflow__tracking_uri="sqlite:////proc/progan-no-mlflow/mlflow.db")
    params = params_mod.load(path)
    monkeypatch.chdir(tmp_path)
    seen, nimgs = [], []
    real_inputs, real_step = step.step_inputs, step.train_step

    def inputs(seed, res, batch, step_nimg, *a, **k):
        nimgs.append(step_nimg)
        return real_inputs(seed, res, batch, step_nimg, *a, **k)

    def train_step(nets, opt_G, opt_D, inp, settings, world, autocast, g_step):
        g0 = [p.detach().clone() for p in nets.G.parameters()]
        d0 = [p.detach().clone() for p in nets.D.parameters()]
        out = real_step(nets, opt_G, opt_D, inp, settings, world, autocast, g_step)
        g_moved = any(not torch.equal(a, b) for a, b in zip(g0, nets.G.parameters()))
        d_moved = any(not torch.equal(a, b) for a, b in zip(d0, nets.D.parameters()))
        seen.append((nimgs[-1], opt_D.param_groups[0]["lr"], opt_G.param_groups[0]["lr"], g_step, g_moved, d_moved))
        return out

    monkeypatch.setattr(step, "step_inputs", inputs)
    monkeypatch.setattr(step, "train_step", train_step)
    with one_thread():
        info = loop.training_loop(params, 4, use_cuda=False)
    official = _official_theano_loop(100, 8, 3, 0.2, 0.002, 0.0005)
    assert len(seen) == len(official) == 13
    for (nimg, lr_D, lr_G, g_step, g_moved, d_moved), want in zip(seen, official):
        assert nimg == want[0] and g_step == want[3], (nimg, want)
        assert lr_D == pytest.approx(want[1], rel=1e-12) and d_moved
        if g_step:
            assert lr_G == pytest.approx(want[2], rel=1e-12) and g_moved
        else:
            assert not g_moved
    assert [s[0] for s in seen if s[3]] == [16, 40, 64, 88, 96]
    assert math.isfinite(info["final"]["g_loss"]) and info["skipped_steps"] == {"skipped_d": 0, "skipped_g": 0}
