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

from dataclasses import dataclass

TRANSITION = "transition"
STABILIZE = "stabilize"
PHASES = (TRANSITION, STABILIZE)


@dataclass(frozen=True)
class StageSchedule:
    """The kimg knobs of one stage (`params.stage(R)`), in images."""

    res_px: int
    batch: int                 # global minibatch (all GPUs together)
    lr: float                  # Adam learning rate for G and D, constant in the stage (official G_lrate_dict /
                               # D_lrate_dict, no ramp)
    transition_nimg: int       # images of the fade-in phase (0 at 4x4)
    stabilize_nimg: int        # images of the stabilisation phase

    @classmethod
    def from_params(cls, params, res_px: int) -> "StageSchedule":
        st = params.stage(res_px)
        return cls(res_px=int(res_px), batch=int(st.batch), lr=float(st.lr),
                   transition_nimg=int(round(float(st.transition_kimg) * 1000)),
                   stabilize_nimg=int(round(float(st.stabilize_kimg) * 1000)))

    @property
    def total_nimg(self) -> int:
        return self.transition_nimg + self.stabilize_nimg


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
