"""GPU paths on this CPU machine with simulated devices (issue #20): CUDA_VISIBLE_DEVICES=0 (or 0,1) makes every
command lease devices as on a GPU box, while torch finds no CUDA and runs on the CPU. Every test runs the real
commands in subprocesses with timeouts, so a lease that waits forever fails instead of hanging the suite.

Each test has its own lock dir (PROGAN_GPU_LOCK_DIR): xdist workers simulate the same device ids at once.
"""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from progan import gpus, paths

from helpers import make_workspace, tiny_params, tool_env

pytestmark = pytest.mark.timeout(600)
STAGE_TIMEOUT_S = 240     # one tiny stage takes ~10-20 s here; a lease that hangs fails the test


def _env(lock_dir: Path, devices: str, **extra) -> dict:
    env = {**tool_env(), "CUDA_VISIBLE_DEVICES": devices, gpus.LOCK_DIR_ENV: str(lock_dir), "OMP_NUM_THREADS": "1",
           **extra}
    for key in (gpus.BUDGET_ENV, gpus.REQUEST_ENV, "LOCAL_RANK", "SLURM_JOB_ID"):
        env.pop(key, None)
    return env


def _progan(ws: Path, env: dict, *args: str, timeout: float = STAGE_TIMEOUT_S) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("progan")), *args, "--params", str(ws / "params.yaml")]
    return subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """A tiny 8 px project (real CelebA faces) up to its pyramid, made with the real commands on the CPU."""
    ws = make_workspace(tmp_path_factory.mktemp("sim") / "ws")
    tiny_params(ws, size_px=8, data__max_images=80, mlflow__tracking_uri="sqlite:///mlflow.db")
    env = _env(ws / "locks", "")
    for stage in ("download", "crop", "pyramid"):
        _ok(_progan(ws, env, stage))
    return ws


def _copy(faces: Path, dest: Path, **overrides) -> Path:
    shutil.copytree(faces, dest, symlinks=True, ignore=shutil.ignore_patterns(".snakemake", "locks"))
    if overrides:
        tiny_params(dest, size_px=8, data__max_images=80, mlflow__tracking_uri="sqlite:///mlflow.db", **overrides)
    return dest


def test_train_on_one_simulated_device_finishes(faces, tmp_path):
    """The reproduction of issue #20: `CUDA_VISIBLE_DEVICES=0 progan train --res 4` waited forever."""
    ws = _copy(faces, tmp_path / "ws")
    err = _ok(_progan(ws, _env(tmp_path / "locks", "0"), "train", "--res", "4"))
    assert "GPU lease: CUDA_VISIBLE_DEVICES=0" in err and "waiting" not in err
    assert err.count("GPU lease") == 1
    assert torch.load(ws / paths.checkpoint(4), weights_only=True)["res_px"] == 4
    # the other GPU commands on the same simulated device
    for args in (("evaluate", "--res", "4"), ("crop",)):
        err = _ok(_progan(ws, _env(tmp_path / "locks", "0"), *args))
        assert err.count("GPU lease: CUDA_VISIBLE_DEVICES=0") == 1, args


def test_two_train_jobs_on_one_device_run_one_after_the_other(faces, tmp_path):
    """Two projects on one machine share its devices: the second job waits for the first one's device, names
    its holder, then runs."""
    lock_dir = tmp_path / "locks"
    a, b = _copy(faces, tmp_path / "a"), _copy(faces, tmp_path / "b")
    env = _env(lock_dir, "0")
    exe = str(Path(sys.executable).with_name("progan"))
    first = subprocess.Popen([exe, "train", "--res", "4", "--params", str(a / "params.yaml")], cwd=a, env=env,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not gpus.holders(lock_dir, ["0"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gpus.holders(lock_dir, ["0"]) == {
            "0": f"pid {first.pid} on {socket.gethostname()} (progan train --res 4 --params {a}/params.yaml)"}
        second = _progan(b, env, "train", "--res", "4")
        first_err = first.communicate(timeout=STAGE_TIMEOUT_S)[1]
    finally:
        first.kill()
    assert first.returncode == 0, first_err[-3000:]
    err = _ok(second)
    assert f"waiting for 1 free GPU(s) among 0: 0 held by pid {first.pid}" in err
    assert err.index("waiting") < err.index("GPU lease: CUDA_VISIBLE_DEVICES=0") < err.index("train 4 px: done")
    # the second got the device only after the first let it go
    assert (a / paths.checkpoint(4)).stat().st_mtime < (b / paths.checkpoint(4)).stat().st_mtime
    assert gpus.holders(lock_dir, ["0"]) == {}


@pytest.mark.slow
def test_two_gpu_stage_leases_both_and_launches_its_workers(faces, tmp_path):
    """train.gpus: 2 on CUDA_VISIBLE_DEVICES=0,1: one lease of both devices, then torchrun with 2 workers (gloo on
    the CPU here) that inherit it instead of leasing again."""
    ws = _copy(faces, tmp_path / "ws", train__gpus=2)
    err = _ok(_progan(ws, _env(tmp_path / "locks", "0,1"), "train", "--res", "4"))
    assert err.count("GPU lease: CUDA_VISIBLE_DEVICES=0,1") == 1
    assert "launching 2 workers" in err and err.count("train 4 px: done") == 1 and "waiting" not in err
    ckpt = torch.load(ws / paths.checkpoint(4), weights_only=True)
    assert ckpt["res_px"] == 4
    assert "train.gpus" in ckpt["params"]


def _snakemake(ws: Path, env: dict, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = ["snakemake", "-s", str(ws / "Snakefile"), "-d", str(ws), *args]
    return subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=timeout)


def _logs(ws: Path) -> dict[str, str]:
    return {p.stem: p.read_text() for p in (ws / "logs").glob("*.log")}


@pytest.mark.slow
def test_snakemake_dag_on_one_simulated_device(faces, tmp_path):
    """The whole tiny DAG through the real `snakemake --cores 2 --resources gpu=1`, train.gpus auto, one simulated
    device: every GPU job asks for 1, leases device 0, and finishes; the checkpoints load on the CPU."""
    _, logs = run_dag_on_one_device(faces, tmp_path, "0")
    assert "train 4 px on cpu x1" in logs["train_4"]          # no CUDA behind the simulated device


def run_dag_on_one_device(faces: Path, tmp_path: Path, device: str) -> tuple[Path, dict[str, str]]:
    """The tiny DAG from scratch through `snakemake --cores 2 --resources gpu=1` with CUDA_VISIBLE_DEVICES=device
    (simulated here; a real GPU in tests/test_cuda.py): every GPU job leases that device once and asks for
    nothing more, the checkpoints load on the CPU, the report exists. Returns the workspace and the jobs' logs."""
    ws = _copy(faces, tmp_path / "ws")
    for folder in ("data", "results"):
        shutil.rmtree(ws / folder, ignore_errors=True)
    proc = _snakemake(ws, _env(tmp_path / "locks", device), "--cores", "2", "--resources", "gpu=1")
    assert proc.returncode == 0, proc.stderr[-5000:]
    logs = _logs(ws)
    gpu_jobs = ["crop", "train_4", "train_8", "evaluate_4", "evaluate_8"]
    for job in gpu_jobs:
        assert logs[job].count(f"GPU lease: CUDA_VISIBLE_DEVICES={device}") == 1, (job, logs[job][-2000:])
        assert "asked for" not in logs[job]
    for r in (4, 8):
        assert torch.load(ws / paths.checkpoint(r), weights_only=True, map_location="cpu")["res_px"] == r
    assert (ws / paths.REPORT_HTML).exists()
    # what each job asked for, as Snakemake planned it
    assert re.findall(r"rule (crop|train|evaluate):.*?resources: [^\n]*gpu=(\d)", proc.stderr, re.S)
    for rule, gpu in re.findall(r"rule (crop|train|evaluate):.*?resources: [^\n]*gpu=(\d)", proc.stderr, re.S):
        assert gpu == "1", rule
    return ws, logs


def _planned_gpus(stderr: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for rule, gpu in re.findall(r"rule (\w+):\n(?:    [^\n]*\n)*?    resources: [^\n]*gpu=(\d+)", stderr):
        out.setdefault(rule, set()).add(gpu)
    return out


def test_dag_requests_come_from_params_not_from_this_machine(faces, tmp_path):
    """On a host without GPUs (a login node), `train.gpus: 4` builds the DAG (it used to fail there) and train
    jobs ask for 4; an explicit count above the budget still fails at once, naming the param."""
    ws = _copy(faces, tmp_path / "ws", train__gpus=4)
    env = _env(tmp_path / "locks", "")
    proc = _snakemake(ws, env, "-n", "-p", "--cores", "2", "--resources", "gpu=8", "--forceall", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned = _planned_gpus(proc.stdout + proc.stderr)
    assert planned["train"] == {"4"}, planned
    assert "PROGAN_GPUS_REQUESTED=4 progan train --res 4" in proc.stdout + proc.stderr
    proc = _snakemake(ws, env, "-n", "--cores", "2", "--resources", "gpu=2", timeout=300)
    assert proc.returncode != 0
    assert "train.gpus is 4 but snakemake --resources gpu=2; lower train.gpus" in proc.stdout + proc.stderr


SUBMIT = """#!/bin/bash
# a stand-in cluster: record what the job asked for, then run its job script here (with no GPU)
echo "$1 gpu=$2" >> "{log}"
shift 2
CUDA_VISIBLE_DEVICES= exec bash "$@"
"""


@pytest.mark.slow
def test_cluster_executor_requests_gpus_from_params(faces, tmp_path):
    """Under a cluster executor (snakemake-executor-plugin-cluster-generic, its jobs run here through a submit
    script) `train.gpus: auto` asks for 1 GPU per job although this host has none, and a job that got no GPU
    says so in one line and trains on the CPU."""
    ws = _copy(faces, tmp_path / "ws")
    shutil.rmtree(ws / "results", ignore_errors=True)
    submit = tmp_path / "submit.sh"
    submit.write_text(SUBMIT.format(log=tmp_path / "submitted.txt"))
    submit.chmod(0o755)
    env = _env(tmp_path / "locks", "")
    proc = _snakemake(ws, env, "--executor", "cluster-generic", "--cluster-generic-submit-cmd",
                      f"{submit} {{rule}} {{resources.gpu}}", "--jobs", "2", "--latency-wait", "5",
                      paths.eval_json(4))
    assert proc.returncode == 0, proc.stderr[-5000:]
    submitted = (tmp_path / "submitted.txt").read_text().split("\n")
    assert "train gpu=1" in submitted and "evaluate gpu=1" in submitted, submitted
    log = (ws / "logs/train_4.log").read_text()
    assert "train: asked for 1 GPU(s) but this job sees 0 (CUDA_VISIBLE_DEVICES=); running on the CPU" in log
    assert torch.load(ws / paths.checkpoint(4), weights_only=True)["res_px"] == 4


@pytest.mark.slow
def test_dvc_repro_on_one_simulated_device(faces, tmp_path):
    """`dvc repro` runs each stage command by hand: each GPU stage leases the device on its own, once."""
    ws = _copy(faces, tmp_path / "ws")
    env = _env(tmp_path / "locks", "0")
    _ok(_progan(ws, env, "dvc-yaml"))      # crop.size 8: its stages (a stale dvc.yaml would stop the first repro)
    for args in (["init", "--no-scm", "-q"], ["repro", "evaluate@4"]):
        proc = subprocess.run(["dvc", *args], cwd=ws, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("GPU lease: CUDA_VISIBLE_DEVICES=0") >= 3        # crop, train 4, evaluate 4
    assert "waiting" not in out
    assert (ws / paths.eval_json(4)).exists()
