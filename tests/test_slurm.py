"""The cluster path (issue #19): the whole tiny DAG through Snakemake's SLURM executor plugin on a real SLURM.

CI starts a one-node cluster on its own host (.ci/slurm-up: this machine's cores and memory, two count-only GPUs,
no accounting). The run uses the project's profile as it is, `--workflow-profile workflow/profiles/slurm`, plus what
a user of such a cluster adds on the command line (README, "Clusters"): the GPU budget, `squeue` for job status
(no accounting, so no `sacct`), and a short first status check. Then: what each job asked SLURM for
(`scontrol show job`, from the profile and the `gpu` resource), the same outputs as the local run, one MLflow parent
with a child per stage, and a second run that submits nothing.

Skipped where no SLURM answers; `PROGAN_TEST_SLURM=require` (set by .ci/run) turns the skip into a failure.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from progan import params as params_mod, paths

from dag_checks import check_each_stage_resumed_from_the_one_before, check_first_mlflow_run, mlflow_runs
from helpers import REPO, make_workspace, tiny_params, tool_env

SIZE_PX = 16
RES = [4, 8, 16]
GPU_BUDGET = 2
# The exact command the README shows for a cluster without accounting, as CI runs it.
SNAKEMAKE_SLURM = ("snakemake --workflow-profile workflow/profiles/slurm --resources gpu=2 "
                   "--slurm-status-command squeue --slurm-init-seconds-before-status-checks 2")
RUN_TIMEOUT_S = 900           # one full run takes ~2 min here; a hung status poll must fail, not stall CI
# GPUs per job under a cluster executor (issue #20): train.gpus auto = 1 per training job, crop and evaluate
# min(1, budget), the CPU stages none.
GPUS_ASKED = {"download": 0, "crop": 1, "pyramid": 0, "train": 1, "evaluate": 1, "report": 0}


def _slurm_missing() -> str | None:
    """Why no SLURM can run the test here, or None when one answers."""
    for exe in ("sbatch", "squeue", "scontrol", "sinfo"):
        if shutil.which(exe) is None:
            return f"{exe} not on PATH (CI: .ci/slurm-up starts a one-node SLURM)"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed (make install)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        nodes = subprocess.run(["sinfo", "--noheader", "--responding", "--states=idle,mixed,allocated",
                                "--format=%n"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"SLURM does not answer: {e}"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return f"slurmctld is not up: {(ping.stdout + ping.stderr).strip()}"
    if not nodes.stdout.strip():
        return "SLURM has no node that can run jobs (sinfo lists none idle/mixed/allocated)"
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = _slurm_missing()
    if reason is not None:
        if os.environ.get("PROGAN_TEST_SLURM") == "require":
            pytest.fail(f"PROGAN_TEST_SLURM=require but {reason}")
        pytest.skip(reason)


def _cancel_jobs_in(ws: Path) -> None:
    """scancel whatever SLURM still has queued or running in this workspace (after a timeout or a crash)."""
    out = subprocess.run(["squeue", "--noheader", "--format=%i|%Z"], capture_output=True, text=True, timeout=30)
    ids = [line.split("|")[0] for line in out.stdout.splitlines() if line.split("|")[-1] == str(ws)]
    if ids:
        subprocess.run(["scancel", *ids], timeout=30, check=False)


def _logs(ws: Path) -> str:
    """Tails of the SLURM job logs the plugin kept (failed jobs) and of the stage logs, for a failure message."""
    parts = []
    for log in sorted((ws / ".snakemake" / "slurm_logs").rglob("*.log")) + sorted((ws / "logs").glob("*.log")):
        parts.append(f"--- {log.relative_to(ws)}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(parts)


def _run(ws: Path) -> str:
    """The README's command in the workspace, with the checkout's venv first on PATH; its output."""
    out_path = ws.parent / f"snakemake-{time.monotonic_ns()}.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(SNAKEMAKE_SLURM.split(), cwd=ws, env=tool_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)          # Snakemake cancels its SLURM jobs on Ctrl-C
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = None
        finally:
            _cancel_jobs_in(ws)
    text = out_path.read_text(errors="replace")
    assert rc is not None, f"snakemake did not finish within {RUN_TIMEOUT_S} s:\n{text[-4000:]}\n{_logs(ws)}"
    assert rc == 0, f"snakemake failed (exit {rc}):\n{text[-6000:]}\n{_logs(ws)}"
    return text


def _job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def _minutes(limit: str) -> int:
    """SLURM's TimeLimit ("D-HH:MM:SS" or "HH:MM:SS") in minutes."""
    days, _, hms = limit.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m + (1 if s else 0)


def _profile() -> dict:
    return yaml.safe_load((REPO / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())


def _check_requests(submitted: list[str]) -> None:
    """Each job asked SLURM for what the profile and its `gpu` resource say: CPUs, memory, wall time, GPUs."""
    profile = _profile()
    defaults = profile["default-resources"]
    seen = []
    for job_id in submitted:
        job = _job(job_id)
        rule = re.fullmatch(r"rule_([a-z]+)(_wildcards_.*)?", job["Comment"]).group(1)
        seen.append(rule)
        want = {**defaults, **profile.get("set-resources", {}).get(rule, {})}
        assert job["JobState"] == "COMPLETED", (rule, job["JobState"])
        assert int(job["NumCPUs"]) == want["cpus_per_task"], (rule, job["NumCPUs"])
        assert job["MinMemoryNode"] == f"{want['mem_mb']}M", (rule, job["MinMemoryNode"])
        assert _minutes(job["TimeLimit"]) == want["runtime"], (rule, job["TimeLimit"])
        gpus = GPUS_ASKED[rule]
        asked = job.get("TresPerJob", "(null)")
        assert asked == (f"gres:gpu:{gpus}" if gpus else "(null)"), f"{rule}: TresPerJob={asked}, want {gpus} GPU(s)"
    assert sorted(seen) == sorted(["download", "crop", "pyramid", "report"] + ["train", "evaluate"] * len(RES))


@pytest.mark.parametrize("missing", ["params.yaml", "progan"])
def test_a_job_that_cannot_see_the_project_or_the_venv_says_so_in_one_line(tmp_path, missing):
    """What a cluster job logs when its node lacks the project folder's params.yaml or the venv's progan (the job
    runs the Snakefile again there; simulated here by removing params.yaml / shadowing progan with a broken one)."""
    ws = make_workspace(tmp_path / "ws")
    tiny_params(ws, size_px=SIZE_PX)
    env = tool_env()
    if missing == "params.yaml":
        (ws / "params.yaml").unlink()
        want = f"no params.yaml in {ws} on host "
    else:
        shadow = tmp_path / "shadow" / "progan"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text("raise ImportError('no progan on this node')\n")
        env["PYTHONPATH"] = str(shadow.parent)
        want = "cannot import progan (no progan on this node): run snakemake from the project's venv"
    proc = subprocess.run(["snakemake", "-n"], cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if want in line]
    assert len(lines) == 1, proc.stdout + proc.stderr


def test_readme_cluster_section_is_what_the_test_runs():
    readme = (REPO / "README.md").read_text()
    assert SNAKEMAKE_SLURM in readme
    assert "snakemake --workflow-profile workflow/profiles/slurm --resources gpu=8" in readme


@pytest.mark.slurm
@pytest.mark.xdist_group("e2e_slurm")
@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 300)
def test_whole_dag_through_slurm_then_nothing_to_do(slurm, tmp_path):
    ws = make_workspace(tmp_path / "ws")
    tiny_params(ws, size_px=SIZE_PX)
    params = params_mod.load(ws / "params.yaml")

    out = _run(ws)
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", out)
    assert len(submitted) == 4 + 2 * len(RES), out[-4000:]
    _check_requests(submitted)
    for r in RES:
        assert (ws / paths.eval_json(r)).is_file()
    assert (ws / paths.REPORT_HTML).is_file()
    check_each_stage_resumed_from_the_one_before(ws, RES)
    check_first_mlflow_run(ws, params, RES)
    _, parents, _ = mlflow_runs(ws, params)   # the parent is the one `progan track-start` made before submitting
    assert re.search(rf"MLflow parent run {parents[0].info.run_id} ", out.split("has been submitted")[0]), out[:4000]

    again = _run(ws)
    assert "Nothing to be done" in again, again[-3000:]
    assert "submitted with SLURM jobid" not in again
    _, parents, _ = mlflow_runs(ws, params)
    assert len(parents) == 1          # a run with nothing to do starts no MLflow parent
