"""Non-finite steps: skipped, not applied, and counted (official tfutil.py Optimizer, L239-355).

The official optimizer applies an update only when every gradient is finite (tfutil.py L346-348 CheckOverflow:
grad_ok = all is_finite; L355 `tf.cond(grad_ok, lambda: opt.apply_gradients(grads), tf.no_op)`), for G and D
separately; its loop never stops. `step_if_finite` does the same without a host sync, `TickStats` keeps the
per-tick sums on the device so the loop still syncs once per tick, and counts the skipped steps; the loop stops
with one clear line after train.max_consecutive_skips skipped steps in a row.
"""
from __future__ import annotations

import math

import torch

from progan.train import dist

STAT_KEYS = ["d_loss", "g_loss", "gp", "d_real", "d_fake"]   # accumulated on the device, synced once per tick
SKIP_KEYS = ["skipped_d", "skipped_g"]                        # steps per tick whose update was skipped
_STAT_STEP = [0, 1, 0, 0, 0]                                  # the step (0 = D, 1 = G) each STAT_KEYS value comes from


def step_if_finite(opt: torch.optim.Optimizer) -> torch.Tensor:
    """opt.step() unless a gradient holds a NaN or Inf (official tfutil.py L346-355: grad_ok = all is_finite,
    then `tf.cond(grad_ok, apply_gradients, no_op)`). Returns 1.0 if the step was skipped, else 0.0, as a tensor
    on the parameters' device: no host sync.

    The mechanism is torch.amp.GradScaler's: `_amp_foreach_non_finite_check_and_unscale_` (scale 1: the gradients
    are unchanged) sets found_inf, and fused Adam, given `found_inf`, leaves every parameter and moment untouched
    and takes back its step count, so a skipped step is exactly no step (tests/test_train.py checks it bit for bit).
    An optimizer that is not fused (a state dict from elsewhere) gets the same decision with one host sync."""
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        opt.step()
        return torch.zeros(())
    found_inf = torch.zeros((), device=grads[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, torch.ones((), device=grads[0].device))
    if not all(g.get("fused") for g in opt.param_groups):
        if found_inf.item() == 0.0:
            opt.step()
        return found_inf
    opt.found_inf = found_inf                     # read by Adam.step (torch/optim/adam.py), as GradScaler does
    try:
        opt.step()
    finally:
        del opt.found_inf
    return found_inf


class TickStats:
    """Per-tick sums of train_step's stats, kept on the device and read once per tick.

    The losses of a skipped step stay out of the tick's means (its update was not applied); `run` counts
    consecutive steps with a skipped update (D or G), across ticks, and `max_run` is its maximum in the tick."""

    def __init__(self, device: torch.device):
        self.step_of = torch.tensor(_STAT_STEP, device=device)
        self.sums = torch.zeros(len(STAT_KEYS), device=device)
        self.applied = torch.zeros(len(SKIP_KEYS), device=device)
        self.run = torch.zeros((), device=device)
        self.max_run = torch.zeros((), device=device)
        self.d_only = torch.tensor([1.0, 0.0], device=device)   # a D step without its G step (train.d_repeats > 1)
        self.steps = [0, 0]                                      # D steps, G steps in the tick

    def add(self, step_stats: torch.Tensor, g_step: bool = True) -> None:
        """One train_step's stats; `g_step` False: it made no G step (its g_loss and g_skipped are left out)."""
        losses, skipped = step_stats[:len(STAT_KEYS)], step_stats[len(STAT_KEYS):]
        applied = 1.0 - skipped
        if not g_step:
            applied = applied * self.d_only.to(applied.dtype)
        self.sums += torch.where(applied[self.step_of] > 0, losses, 0.0)
        self.applied += applied
        self.run = (self.run + 1.0) * skipped.amax()
        torch.maximum(self.max_run, self.run, out=self.max_run)
        self.steps[0] += 1
        self.steps[1] += int(g_step)

    def read(self, world: int) -> tuple[dict[str, float], int]:
        """({STAT_KEYS: mean over applied steps (NaN if none), SKIP_KEYS: count}, longest run of skipped steps);
        the one host sync per tick. Sums are averaged over ranks; counts are the same on every rank."""
        values = dist.all_reduce_mean(torch.cat([self.sums, self.applied, self.max_run[None]]), world).tolist()
        sums, applied, max_run = values[:len(STAT_KEYS)], values[len(STAT_KEYS):-1], int(round(values[-1]))
        out = {k: (s / applied[i] if applied[i] > 0 else math.nan) for k, s, i in zip(STAT_KEYS, sums, _STAT_STEP)}
        out.update({k: n - int(round(a)) for k, n, a in zip(SKIP_KEYS, self.steps, applied)})
        return out, max_run

    def next_tick(self) -> None:
        self.sums.zero_(), self.applied.zero_(), self.max_run.zero_()
        self.steps = [0, 0]
