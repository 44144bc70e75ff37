"""The training schedule of one growth stage: phase, fade-in alpha and learning rate as pure functions of
the images shown so far in the stage (`cur_nimg`).

Follows `TrainingSchedule` in tkarras/progressive_growing_of_gans `train.py`, cut into one job per
resolution: the official run alternates "train at lod" / "transition to lod-1"; here stage R first
fades its new layers in (`transition_kimg`, alpha 0 -> 1, paper §3 / Fig. 2) then stabilises
(`stabilize_kimg`, alpha 1). The 4x4 stage has nothing to fade in (transition_kimg 0).

Deviations: the official loop re-evaluates the schedule every `minibatch_repeats`=4 minibatches; here
it is evaluated before every minibatch (alpha moves in smaller steps, same line). At a transition's start the
official lod is still integral for one minibatch (the new block at weight 0) and Adam is reset after it; here
the stage starts with new optimizers one minibatch earlier (tests/test_schedule.py rebuilds the official lod).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

TRANSITION = "transition"
STABILIZE = "stabilize"
PHASES = (TRANSITION, STABILIZE)


@dataclass(frozen=True)
class StageSchedule:
    """The kimg knobs of one stage (`params.stage(R)`), in images."""

    res_px: int
    batch: int                 # global minibatch (all GPUs together)
    lr: float                  # Adam learning rate of G (and of D unless lr_D), constant in the stage but for
                               # train.lr_rampup_kimg (official G_lrate_dict / D_lrate_dict, train.py L96-99, L125-126)
    transition_nimg: int       # images of the fade-in phase (0 at 4x4)
    stabilize_nimg: int        # images of the stabilisation phase
    lr_D: float | None = None  # D's learning rate when it differs from G's (stage lr {G: .., D: ..})

    @classmethod
    def from_params(cls, params, res_px: int) -> "StageSchedule":
        st = params.stage(res_px)
        lr_G, lr_D = stage_lrs(st.lr)
        return cls(res_px=int(res_px), batch=int(st.batch), lr=lr_G, lr_D=lr_D,
                   transition_nimg=int(round(float(st.transition_kimg) * 1000)),
                   stabilize_nimg=int(round(float(st.stabilize_kimg) * 1000)))

    @property
    def lrs(self) -> tuple[float, float]:
        """(G's, D's) learning rate."""
        return self.lr, self.lr if self.lr_D is None else self.lr_D

    @property
    def total_nimg(self) -> int:
        return self.transition_nimg + self.stabilize_nimg


def stage_lrs(lr) -> tuple[float, float]:
    """(G's, D's) learning rate of a stage's `lr`: one number for both, or {G: .., D: ..} (official G_lrate /
    D_lrate: TF train.py L96-99, L125-126; Theano G_learning_rate_max / D_learning_rate_max, config.py@2609d1f
    L45-46)."""
    if isinstance(lr, Mapping):
        return float(lr["G"]), float(lr["D"])
    return float(lr), float(lr)


def lr_rampup(total_kimg: float, rampup_kimg: float) -> float:
    """The learning-rate factor at `total_kimg` images of the whole run (not of the stage): exp(-5 (1 - t)^2),
    t = total_kimg / rampup_kimg, up to rampup_kimg, then 1 (Theano misc.py@2609d1f L79-85 rampup, applied to
    G_ and D_learning_rate_max in train.py L207-210; the TF release has no ramp). rampup_kimg 0: always 1."""
    if total_kimg >= rampup_kimg:
        return 1.0
    p = 1.0 - max(0.0, float(total_kimg)) / float(rampup_kimg)
    return math.exp(-p * p * 5.0)


def phase(s: StageSchedule, cur_nimg: int) -> str:
    """'transition' while cur_nimg < transition_nimg, then 'stabilize' (also past the end)."""
    return TRANSITION if cur_nimg < s.transition_nimg else STABILIZE


def alpha(s: StageSchedule, cur_nimg: int) -> float:
    """Fade-in weight of the new layers: linear 0 -> 1 over the transition images, then 1.

    Official: alpha = 1 - frac(lod), lod -= max(phase_kimg - lod_training_kimg, 0) / lod_transition_kimg.
    """
    if s.transition_nimg <= 0 or cur_nimg >= s.transition_nimg:
        return 1.0
    return max(cur_nimg, 0) / s.transition_nimg


def reset_optimizer(s: StageSchedule, prev_nimg: int | None, cur_nimg: int) -> bool:
    """Whether Adam state is reset before the minibatch at cur_nimg (official `reset_opt_for_new_lod`:
    when floor(lod) or ceil(lod) changes, i.e. at the start of every phase). prev_nimg None = stage start."""
    if prev_nimg is None:
        return True
    return phase(s, prev_nimg) != phase(s, cur_nimg)


def phase_bounds_nimg(s: StageSchedule, name: str) -> tuple[int, int]:
    """[start, end) images of a phase."""
    if name == TRANSITION:
        return 0, s.transition_nimg
    if name == STABILIZE:
        return s.transition_nimg, s.total_nimg
    raise ValueError(f"unknown phase {name!r}")
