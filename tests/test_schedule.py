"""Growth schedule of one stage (train/schedule.py): phase, alpha, lr and optimizer resets at known nimg."""
import pytest

from progan import params as params_mod
from progan.train import schedule
from progan.train.schedule import STABILIZE, TRANSITION, StageSchedule

from helpers import write_params


def _s(transition_kimg=600, stabilize_kimg=600, batch=16):
    return StageSchedule(res_px=8, batch=batch, lr=0.001, transition_nimg=int(transition_kimg * 1000),
                         stabilize_nimg=int(stabilize_kimg * 1000))


def test_alpha_rises_linearly_over_the_transition_then_stays_one():
    s = _s()
    # 600 kimg transition: alpha = nimg / 600000
    assert schedule.alpha(s, 0) == 0.0
    assert schedule.alpha(s, 150_000) == 0.25
    assert schedule.alpha(s, 300_000) == 0.5
    assert schedule.alpha(s, 599_999) == pytest.approx(599_999 / 600_000)
    assert schedule.alpha(s, 600_000) == 1.0
    assert schedule.alpha(s, 1_199_984) == 1.0
    assert schedule.alpha(s, 5_000_000) == 1.0       # past the end (last minibatch may overshoot)


def test_phase_boundaries():
    s = _s()
    assert schedule.phase(s, 0) == TRANSITION
    assert schedule.phase(s, 599_999) == TRANSITION
    assert schedule.phase(s, 600_000) == STABILIZE
    assert schedule.phase_index(s, 600_000) == 1
    assert schedule.phase_bounds_nimg(s, TRANSITION) == (0, 600_000)
    assert schedule.phase_bounds_nimg(s, STABILIZE) == (600_000, 1_200_000)


def test_4x4_has_no_transition():
    s = _s(transition_kimg=0, stabilize_kimg=600)
    assert schedule.phase(s, 0) == STABILIZE
    assert schedule.alpha(s, 0) == 1.0


def test_official_lod_formula_agrees():
    """Official TrainingSchedule: lod -= max(phase_kimg - lod_training_kimg, 0) / lod_transition_kimg and
    alpha = 1 - frac(lod). In the official order a phase is 'train' then 'transition'; our stage R begins
    with the transition of the official phase that grows R/2 -> R."""
    training_kimg, transition_kimg = 600.0, 600.0
    s = _s(transition_kimg, training_kimg)
    for nimg in (0, 1, 123_456, 300_000, 450_016, 599_984):
        kimg_official = training_kimg + nimg / 1000        # the same image, counted from the R/2 phase start
        lod_frac = max(kimg_official - training_kimg, 0.0) / transition_kimg
        assert schedule.alpha(s, nimg) == pytest.approx(lod_frac, abs=1e-12)


def test_reset_optimizer_at_each_phase_start():
    s = _s(transition_kimg=0.064, stabilize_kimg=0.064, batch=16)   # 4 minibatches each
    starts = [n for n in range(0, s.total_nimg, s.batch)
              if schedule.reset_optimizer(s, n - s.batch if n else None, n)]
    assert starts == [0, 64]


def test_steps_and_overshoot():
    s = _s(transition_kimg=0.1, stabilize_kimg=0.1, batch=16)        # 200 images -> 13 minibatches (208)
    assert s.total_nimg == 200
    assert s.total_steps == 13


def test_from_params_reads_the_stage(tmp_path):
    path = write_params(tmp_path, train__stages={"4": {"batch": 16, "lr": 0.001, "transition_kimg": 0, "stabilize_kimg": 1.5},
                                                 "8": {"batch": 8, "lr": 0.002, "transition_kimg": 0.25, "stabilize_kimg": 2},
                                                 **{str(r): {"batch": 4, "lr": 0.001, "transition_kimg": 1, "stabilize_kimg": 1}
                                                    for r in (16, 32, 64, 128)}})
    s = StageSchedule.from_params(params_mod.load(path), 8)
    assert (s.res_px, s.batch, s.lr, s.transition_nimg, s.stabilize_nimg) == (8, 8, 0.002, 250, 2000)
    assert schedule.lr(s, 0) == 0.002
