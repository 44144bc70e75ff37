"""Mid-stage resume: SIGKILL a real `progan train` subprocess after its first snapshot, re-run it, and get a
checkpoint BIT-IDENTICAL to an uninterrupted run (CPU, train.deterministic). Also: a NaN stop keeps the last
good snapshot, and a damaged snapshot is a one-line error, never silently dropped."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from progan import params as params_mod, paths
from progan.errors import ProganError
from progan.train import loop

from helpers import kill_when_file_exists
from test_train import NO_MLFLOW, _stage, make_project, one_thread

PROGAN = str(Path(sys.executable).with_name("progan"))
STAGES = {"4": _stage(8, 0, 0.1), "8": _stage(8, 0.3, 0.3)}     # stage 8: 75 minibatches, snapshot every 0.1 kimg


def _env():
    # One intra-op thread: the same in every run (and fast on a shared machine); MLflow off (fails fast).
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": NO_MLFLOW}


def _train(params_path, res, **kw):
    return subprocess.run([PROGAN, "train", "--res", str(res), "--params", str(params_path)], env=_env(),
                          capture_output=True, text=True, timeout=300, **kw)


def _loss_columns(tsv: Path):
    """Every column but the timings (img_s, seconds)."""
    return [line.split("\t")[:-2] for line in tsv.read_text().splitlines()]


def _assert_same_tensors(a, b, where="checkpoint"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_sigkill_then_resume_is_bit_identical(tmp_path, monkeypatch):
    params_path = make_project(tmp_path, stages=STAGES, mlflow__tracking_uri=NO_MLFLOW)
    monkeypatch.chdir(tmp_path)
    with one_thread():
        loop.run(params_mod.load(params_path), res=4)

    # 1. Uninterrupted run of stage 8 (it writes snapshots too, then removes them).
    done = _train(params_path, 8)
    assert done.returncode == 0, done.stderr[-2000:]
    ref = tmp_path / "ref8"
    shutil.move("results/8", ref)

    # 2. The same run, SIGKILLed as soon as its first snapshot exists.
    snap = Path(paths.resume_dir(8)) / "snapshot.pt"
    kill_when_file_exists([PROGAN, "train", "--res", "8", "--params", str(params_path)], snap, env=_env())
    assert snap.is_file() and not Path(paths.checkpoint(8)).exists(), "killed too late: the stage had finished"
    snap_kimg = torch.load(snap, weights_only=True)["cur_nimg"] / 1000
    assert 0.1 <= snap_kimg < 0.6
    snap_bytes = snap.read_bytes()

    # 3. A NaN while resuming (absurd lr) stops with one line naming the snapshot, and keeps it untouched.
    nan_params = params_path.with_name("params_nan.yaml")
    nan_params.write_text(params_path.read_text().replace("lr: 0.001", "lr: 1.0e+30")
                          .replace("max_consecutive_skips: 100", "max_consecutive_skips: 3"))
    with one_thread(), pytest.raises(ProganError) as e:
        loop.run(params_mod.load(nan_params), res=8)
    assert "non-finite loss" in str(e.value)
    assert f"last good snapshot results/8/.resume/snapshot.pt (stage kimg {snap_kimg:.3f}) kept" in str(e.value)
    assert snap.read_bytes() == snap_bytes and not Path(paths.checkpoint(8)).exists()

    # 4. Re-run the plain command: it continues from the snapshot and ends exactly where the uninterrupted run did.
    resumed = _train(params_path, 8)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from results/8/.resume/snapshot.pt at stage kimg {snap_kimg:.1f}" in resumed.stderr
    assert not Path(paths.resume_dir(8)).exists()
    a = torch.load(ref / "checkpoint.pt", weights_only=True)
    b = torch.load(paths.checkpoint(8), weights_only=True)
    for key in ("G", "D", "G_ema", "opt_G", "opt_D", "cur_nimg", "total_kimg", "alpha", "rng", "prev_checkpoint_sha256"):
        _assert_same_tensors(a[key], b[key], key)
    assert _loss_columns(ref / "losses.tsv") == _loss_columns(Path(paths.losses_tsv(8)))
    assert (ref / "samples.png").read_bytes() == Path(paths.samples_png(8)).read_bytes()


def test_damaged_snapshot_is_an_error(tmp_path, monkeypatch):
    params_path = make_project(tmp_path, mlflow__tracking_uri=NO_MLFLOW)
    monkeypatch.chdir(tmp_path)
    snap = Path(paths.resume_dir(4)) / "snapshot.pt"
    snap.parent.mkdir(parents=True)
    snap.write_bytes(b"\x80\x02 truncated")
    with pytest.raises(ProganError, match=r"results/4/.resume/snapshot.pt: not a progan snapshot \(not a torch.save file.*"
                                          r"delete results/4/.resume to restart the stage"):
        loop.run(params_mod.load(params_path), res=4)
    assert snap.exists()
