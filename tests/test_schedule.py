"""Growth schedule of one stage (train/schedule.py): phase, alpha, lr and optimizer resets at known nimg."""
import math

import numpy as np
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
    assert schedule.phase_bounds_nimg(s, TRANSITION) == (0, 600_000)
    assert schedule.phase_bounds_nimg(s, STABILIZE) == (600_000, 1_200_000)


def test_4x4_has_no_transition():
    s = _s(transition_kimg=0, stabilize_kimg=600)
    assert schedule.phase(s, 0) == STABILIZE
    assert schedule.alpha(s, 0) == 1.0


def _official_lod(cur_nimg, resolution_log2, lod_training_kimg, lod_transition_kimg, lod_initial_resolution=4):
    """tkarras/progressive_growing_of_gans train.py TrainingSchedule.__init__ (lines 'Training phase' and
    'Level-of-detail and resolution'), as written there."""
    kimg = cur_nimg / 1000.0
    phase_dur = lod_training_kimg + lod_transition_kimg
    phase_idx = int(np.floor(kimg / phase_dur)) if phase_dur > 0 else 0
    phase_kimg = kimg - phase_idx * phase_dur
    lod = resolution_log2
    lod -= np.floor(np.log2(lod_initial_resolution))
    lod -= phase_idx
    if lod_transition_kimg > 0:
        lod -= max(phase_kimg - lod_training_kimg, 0.0) / lod_transition_kimg
    return max(lod, 0.0)


def _official_alpha(lod_in, resolution_log2, res_px):
    """The weight of the res_px block in the official G_paper / D_paper: `lerp_clip(new, old, lod_in - lod)` with
    lod = resolution_log2 - log2(res_px) (networks.py, G grow / D grow), i.e. new * (1 - clip(lod_in - lod))."""
    return 1.0 - float(np.clip(lod_in - (resolution_log2 - math.log2(res_px)), 0.0, 1.0))


def test_alpha_phase_and_resets_follow_the_official_lod():
    """One official run (4 -> 32 px: training 48 images, then transition 80 images, per phase) cut into our stages:
    stage 4 = the first training phase; stage R >= 8 = the transition to R, then the training phase at R. At every
    minibatch our alpha is the official weight of the R block at the official lod, and our phase is 'transition'
    exactly while that weight is below 1. Adam is reset where the official code resets it (reset_opt_for_new_lod:
    floor(lod) or ceil(lod) changed since the previous minibatch), with one deviation: at a transition's start the
    official lod is still integral for one minibatch (the R block at weight 0), so it resets one minibatch later
    than our stage, which starts with new optimizers."""
    training_kimg, transition_kimg, batch, log2_top = 0.048, 0.080, 16, 5
    for res in (4, 8, 16, 32):
        s = _s(0 if res == 4 else transition_kimg, training_kimg, batch)
        offset_nimg = 0 if res == 4 else round(1000 * (training_kimg + (math.log2(res) - 3) * (training_kimg + transition_kimg)))
        lods = {n: _official_lod(offset_nimg + n, log2_top, training_kimg, transition_kimg)
                for n in range(-batch, s.total_nimg, batch)}
        if res == 4:
            lods[-batch] = -1.0                                          # official prev_lod before the first minibatch
        official_resets, our_resets = set(), set()
        for n in range(0, s.total_nimg, batch):
            lod, prev = lods[n], lods[n - batch]
            assert schedule.alpha(s, n) == pytest.approx(_official_alpha(lod, log2_top, res), abs=1e-12), (res, n)
            assert (schedule.phase(s, n) == TRANSITION) == (lod > log2_top - math.log2(res)), (res, n, lod)
            if (math.floor(lod), math.ceil(lod)) != (math.floor(prev), math.ceil(prev)):
                official_resets.add(n)
            if schedule.reset_optimizer(s, n - batch if n else None, n):
                our_resets.add(n)
        expected = official_resets if res == 4 else (official_resets - {batch}) | {0}
        assert batch in official_resets or res == 4
        assert our_resets == expected, (res, sorted(our_resets), sorted(official_resets))


def test_reset_optimizer_at_each_phase_start():
    s = _s(transition_kimg=0.064, stabilize_kimg=0.064, batch=16)   # 4 minibatches each
    starts = [n for n in range(0, s.total_nimg, s.batch)
              if schedule.reset_optimizer(s, n - s.batch if n else None, n)]
    assert starts == [0, 64]


def test_steps_and_overshoot():
    s = _s(transition_kimg=0.1, stabilize_kimg=0.1, batch=16)        # 200 images -> 13 minibatches (208)
    assert s.total_nimg == 200
    assert len(range(0, s.total_nimg, s.batch)) == 13                # the last minibatch overshoots to 208


def test_from_params_reads_the_stage(tmp_path):
    path = write_params(tmp_path, train__stages={"4": {"batch": 16, "lr": 0.001, "transition_kimg": 0, "stabilize_kimg": 1.5},
                                                 "8": {"batch": 8, "lr": 0.002, "transition_kimg": 0.25, "stabilize_kimg": 2},
                                                 **{str(r): {"batch": 4, "lr": 0.001, "transition_kimg": 1, "stabilize_kimg": 1}
                                                    for r in (16, 32, 64, 128)}})
    s = StageSchedule.from_params(params_mod.load(path), 8)
    assert (s.res_px, s.batch, s.lr, s.transition_nimg, s.stabilize_nimg) == (8, 8, 0.002, 250, 2000)
