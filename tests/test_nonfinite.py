"""Steps with non-finite gradients are skipped, not applied (official tfutil.py Optimizer L346-355:
`tf.cond(grad_ok, apply_gradients, no_op)`), counted per tick, and a run of them stops the stage with one line.

The skip is torch.amp.GradScaler's found_inf mechanism on fused Adam; here it is checked to be exactly "no step"
(bit for bit: weights, moments and step count), and an Inf is injected into real gradients of the real loop.
"""
from __future__ import annotations

import json
import logging
import math
import sqlite3
from pathlib import Path

import pytest
import torch

from progan import params as params_mod, paths
from progan.errors import ProganError
from progan.train import dist, loop, step
from progan.train.nonfinite import SKIP_KEYS, STAT_KEYS, TickStats, step_if_finite

from test_train import NO_MLFLOW, _stage, make_project, one_thread


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LeakyReLU(0.2), torch.nn.Linear(4, 1))


def _grads(net, seed):
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _state(net, opt):
    return ({k: v.clone() for k, v in net.state_dict().items()},
            {i: {k: v.clone() for k, v in st.items()} for i, st in opt.state_dict()["state"].items()})


def _equal(a, b) -> bool:
    (wa, sa), (wb, sb) = a, b
    return (all(torch.equal(wa[k], wb[k]) for k in wa) and set(sa) == set(sb)
            and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i]))


def _adam(net, fused=True):
    return torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.0, 0.99), eps=1e-8, fused=fused)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_a_skipped_step_is_exactly_no_step(bad):
    """A: g1, g_bad (skipped), g2, g3. B: g1, g2, g3. Bit-identical weights, moments and step counts after every
    applied step; and the skipped step itself changes nothing, not even the step count."""
    a, b = _net(), _net()
    opt_a, opt_b = _adam(a), _adam(b)
    _grads(a, 1), _grads(b, 1)
    assert step_if_finite(opt_a).item() == 0.0 and step_if_finite(opt_b).item() == 0.0
    before = _state(a, opt_a)
    _grads(a, 9)
    next(iter(a.parameters())).grad[0, 0] = bad                      # one bad value among 29
    assert step_if_finite(opt_a).item() == 1.0
    assert _equal(_state(a, opt_a), before)
    for seed in (2, 3):
        _grads(a, seed), _grads(b, seed)
        assert step_if_finite(opt_a).item() == 0.0 and step_if_finite(opt_b).item() == 0.0
        assert _equal(_state(a, opt_a), _state(b, opt_b))
    assert {float(st["step"]) for st in opt_a.state_dict()["state"].values()} == {3.0}


def test_a_skipped_first_step_leaves_a_fresh_optimizer():
    a, b = _net(), _net()
    opt_a, opt_b = _adam(a), _adam(b)
    _grads(a, 1)
    next(iter(a.parameters())).grad[0, 0] = math.nan
    assert step_if_finite(opt_a).item() == 1.0
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    _grads(a, 2), _grads(b, 2)
    step_if_finite(opt_a), step_if_finite(opt_b)
    assert _equal(_state(a, opt_a), _state(b, opt_b))


def test_fused_adam_is_the_plain_adam_math():
    """Fused Adam (needed for the on-device skip) computes the same update as torch's reference Adam."""
    a, b = _net(), _net()
    opt_a, opt_b = _adam(a), torch.optim.Adam(b.parameters(), lr=0.01, betas=(0.0, 0.99), eps=1e-8, foreach=False)
    for seed in range(5):
        _grads(a, seed), _grads(b, seed)
        opt_a.step(), opt_b.step()
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-7)


def test_not_fused_optimizer_skips_the_same_way_with_a_host_sync():
    a, b = _net(), _net()
    opt_a = torch.optim.Adam(a.parameters(), lr=0.01, foreach=False)
    _grads(a, 1)
    next(iter(a.parameters())).grad[1, 2] = math.inf
    assert step_if_finite(opt_a).item() == 1.0
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters())) and not opt_a.state


def test_tick_stats_leave_skipped_losses_out_and_count_runs():
    t = TickStats(torch.device("cpu"))
    nan = math.nan
    #            d_loss g_loss gp   d_real d_fake  d_skip g_skip
    t.add(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0]))
    t.add(torch.tensor([nan, 9.0, nan, nan, nan, 1.0, 0.0]))    # D skipped: its losses stay out
    t.add(torch.tensor([3.0, nan, 1.0, 2.0, 3.0, 0.0, 1.0]))    # G skipped
    t.add(torch.tensor([nan, nan, nan, nan, nan, 1.0, 1.0]))    # both
    values, max_run = t.read(1)
    assert values == {"d_loss": 2.0, "g_loss": 5.5, "gp": 2.0, "d_real": 3.0, "d_fake": 4.0,
                      "skipped_d": 2, "skipped_g": 2}
    assert max_run == 3                                          # steps 2, 3 and 4 each skipped something
    t.next_tick()
    t.add(torch.tensor([nan] * 5 + [1.0, 0.0]))                  # the run goes on across the tick
    values, max_run = t.read(1)
    assert max_run == 4 and values["skipped_d"] == 1 and math.isnan(values["d_loss"]) and math.isnan(values["g_loss"])
    t.next_tick()
    t.add(torch.tensor([1.0] * 5 + [0.0, 0.0]))
    assert t.read(1)[1] == 0


# ---------------------------------------------------------------------------------------------- in the loop

class _InjectInf:
    """Wraps dist.average_gradients (called right after each backward, D then G): puts an Inf into the first
    gradient on the chosen calls (0 = the first step's D, 1 = its G, 2 = the next D, ...)."""

    def __init__(self, calls):
        self.calls, self.n = set(calls), 0
        self.real = dist.average_gradients

    def __call__(self, params, world):
        self.real(params, world)
        if self.n in self.calls:
            next(p for p in params if p.grad is not None).grad.view(-1)[0] = math.inf
        self.n += 1


def test_train_step_skips_only_the_step_with_the_inf(tmp_path, monkeypatch):
    path = make_project(tmp_path, mlflow__tracking_uri=NO_MLFLOW)
    monkeypatch.chdir(tmp_path)
    p = params_mod.load(path)
    import test_dist
    monkeypatch.setattr(test_dist, "RES", 8)
    for call, side in ((0, "D"), (1, "G")):
        _, nets, opt_G, opt_D, inputs = test_dist._setup(path)
        before = {n: {k: v.clone() for k, v in getattr(nets, n).state_dict().items()} for n in ("G", "D", "G_ema")}
        monkeypatch.setattr(dist, "average_gradients", _InjectInf([call]))
        settings = step.Settings(p.train.loss, p.train.gp_weight, p.train.drift_weight, p.train.ema_decay)
        stats = step.train_step(nets, opt_G, opt_D, step.StepInputs(*inputs, test_dist.ALPHA), settings, 1)
        assert stats[5:].tolist() == ([1.0, 0.0] if side == "D" else [0.0, 1.0])
        same = {n: all(torch.equal(v, before[n][k]) for k, v in getattr(nets, n).state_dict().items())
                for n in ("G", "D")}
        assert same == {"D": side == "D", "G": side == "G"}
        skipped_opt = opt_D if side == "D" else opt_G
        assert not skipped_opt.state or {float(s["step"]) for s in skipped_opt.state.values()} == {0.0}
        # G_ema moved on anyway (official Gs_update_op runs every step), towards G
        assert any(not torch.equal(v, before["G_ema"][k]) for k, v in nets.G_ema.state_dict().items()) or side == "G"


def test_loop_counts_skipped_steps_per_tick(tmp_path, monkeypatch, caplog):
    """Stage 4: 13 minibatches of 8, ticks at 0.056 and 0.104 kimg. Inf in the D step of minibatch 2 and the G step
    of minibatches 4 and 9: losses.tsv, the log line, train.json and MLflow count them; training goes on."""
    path = make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dist, "average_gradients", _InjectInf([2 * 2, 2 * 4 + 1, 2 * 9 + 1]))
    with one_thread(), caplog.at_level(logging.INFO, logger="progan"):
        info = loop.run(params_mod.load(path), res=4)
    rows = [dict(zip(loop.LOSS_COLUMNS, r.split("\t"))) for r in Path(paths.losses_tsv(4)).read_text().splitlines()[1:]]
    assert [(r["stage_kimg"], r["skipped_d"], r["skipped_g"]) for r in rows] == [("0.056", "1", "1"), ("0.104", "0", "1")]
    assert all(math.isfinite(float(r[k])) for r in rows for k in STAT_KEYS)
    assert info["skipped_steps"] == {"skipped_d": 1, "skipped_g": 2}
    assert json.loads(Path(paths.train_json(4)).read_text())["skipped_steps"] == {"skipped_d": 1, "skipped_g": 2}
    assert any("skipped D 1 G 1 (non-finite gradients)" in r.getMessage() for r in caplog.records)
    con = sqlite3.connect(tmp_path / "mlflow.db")
    got = {k: [v for (v,) in con.execute("select value from metrics where key=? order by step", (k,))]
           for k in SKIP_KEYS}
    con.close()
    assert got == {"skipped_d": [1.0, 0.0], "skipped_g": [1.0, 1.0]}


def test_a_run_of_skipped_steps_stops_the_stage_with_one_line(tmp_path, monkeypatch):
    """Every step from minibatch 3 on has an Inf in its D gradients: after train.max_consecutive_skips (4) in a row
    the stage stops at the end of that tick, naming the count, the kimg and what to do; nothing is written."""
    path = make_project(tmp_path, stages={"4": _stage(8, 0, 0.2), "8": _stage(8, 0.05, 0.05)},
                        mlflow__tracking_uri=NO_MLFLOW, train__max_consecutive_skips=4)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dist, "average_gradients", _InjectInf(range(6, 1000, 2)))
    with one_thread(), pytest.raises(ProganError) as e:
        loop.run(params_mod.load(path), res=4)
    msg = str(e.value)
    assert msg.startswith("train 4 px: non-finite loss or gradients in 4 consecutive steps, all skipped "
                          "(train.max_consecutive_skips 4; tick means d_loss=")
    assert "at stage kimg 0.056 (stabilize); no snapshot yet; lower train.stages.4.lr" in msg and "\n" not in msg
    assert not Path(paths.checkpoint(4)).exists()
