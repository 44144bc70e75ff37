"""`make test-gpu` (bench/gpu_check.py) and the device script (.ci/device-check) where there is no GPU: the summary
is written when every gpu test skips, a run past its timeout is stopped and said so, bad arguments are one line.
What they do on a GPU is for a lent device (README, GPU section)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

BENCH = REPO / "bench"

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def _gpu_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """bench/gpu_check.py with torch seeing no CUDA device (CUDA_VISIBLE_DEVICES empty: so also on a GPU box)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(tmp_path / "o"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    summary_path = tmp_path / "o" / "summary.json"
    return proc, json.loads(summary_path.read_text()) if summary_path.exists() else {}


def test_the_summary_when_every_gpu_test_skips(tmp_path):
    proc, summary = _gpu_check(tmp_path, "--", "tests/test_cuda.py", "-k", "one_training_step and fp32")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tests = summary["tests"]
    assert tests["rc"] == 0 and not tests["timed_out"]
    names = {t["test"]: t for t in tests["tests"]}
    assert set(names) == {"tests/test_cuda.py::test_one_training_step_matches_the_cpu[cuda-fp32]",
                          "tests/test_cuda.py::test_one_training_step_matches_the_cpu[cuda-fp32-channels-last]"}, names
    for t in names.values():        # the cpu-self-check cases carry no gpu marker: not selected
        assert t["outcome"] == "skipped" and "no CUDA device" in t["message"], t
    assert tests["counts"] == {"passed": 0, "failed": 0, "error": 0, "skipped": 2}
    m = summary["machine"]
    assert m["cuda_available"] is False and m["gpus"] == [] and m["torch"] and m["date_utc"].endswith("Z")
    assert summary["benchmarks"] == [] and "no CUDA device" in summary["benchmarks_note"]
    assert summary["ok"] is True
    log = (tmp_path / "o" / "test-gpu.log").read_text()
    assert "SKIPPED" in log and "=== test-gpu: ok" in log and (tmp_path / "o" / "junit.xml").is_file()


def test_gpu_tests_past_their_timeout_are_stopped_and_reported(tmp_path):
    proc, summary = _gpu_check(tmp_path, "--tests-timeout-s", "1", "--", "tests/test_cuda.py")
    assert proc.returncode == 1
    assert summary["tests"]["timed_out"] is True and summary["tests"]["rc"] is None and summary["ok"] is False
    assert "=== gpu tests: killed after 1 s" in (tmp_path / "o" / "test-gpu.log").read_text()


def test_bad_arguments_are_one_line():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--budget-s", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--budget-s and --tests-timeout-s must be positive" in proc.stderr


@pytest.mark.parametrize("full", [False, True])
def test_figures_use_no_more_faces_than_the_device_was_given(full):
    runs = gpu_check.figure_runs(300, full)
    assert [t for t, _ in runs] == [t for t, _ in (gpu_check.run_all.GPU_RUNS if full else gpu_check.QUICK_GPU_RUNS)]
    scripts = {argv[0] for _, argv in runs}
    assert scripts == {"bench_train.py", "bench_swd.py", "bench_crop.py", "bench_data.py"}
    for title, argv in runs:
        assert (BENCH / argv[0]).is_file()
        if argv[0] in ("bench_crop.py", "bench_data.py") and "--images" not in argv:
            assert argv[argv.index("--n") + 1] == "300", (title, argv)
    assert dict(gpu_check.figure_runs(5000, True))["pyramid + loader"] == ["bench_data.py", "--n", "2010", "--size",
                                                                           "128"]


def test_quick_figures_take_arguments_the_benchmarks_know():
    """Every flag QUICK_GPU_RUNS passes is one its script's argparse defines (their --help, no GPU needed)."""
    helptexts = {}
    for title, argv in gpu_check.QUICK_GPU_RUNS:
        if argv[0] not in helptexts:
            helptexts[argv[0]] = subprocess.run([sys.executable, str(BENCH / argv[0]), "--help"], capture_output=True,
                                                text=True, timeout=120, cwd=REPO).stdout
        for flag in (a for a in argv[1:] if a.startswith("--")):
            assert re.search(rf"{flag}\b(?!-)", helptexts[argv[0]]), (title, flag)


def test_verbose_outcomes_read_a_killed_run():
    lines = ["tests/test_cuda.py::test_a[cuda] PASSED  [ 10%]\n", "noise\n",
             "tests/test_cuda.py::test_b[cuda] SKIPPED (no CUDA device)\n"]
    assert [(t["test"], t["outcome"]) for t in gpu_check.verbose_outcomes(lines)] == [
        ("tests/test_cuda.py::test_a[cuda]", "passed"), ("tests/test_cuda.py::test_b[cuda]", "skipped")]


@pytest.fixture
def device_check(tmp_path) -> Path:
    """.ci/device-check in an empty checkout of its own (no .device/): nothing of this checkout is touched."""
    (tmp_path / ".ci").mkdir()
    shutil.copy2(REPO / ".ci" / "device-check", tmp_path / ".ci" / "device-check")
    return tmp_path / ".ci" / "device-check"


@pytest.mark.parametrize("argv, rc, needle", [
    (["--help"], 0, "device-check run [--timeout-s S]"),
    (["run", "--help"], 0, "carry=[\".device\"]"),
    ([], 2, "device-check prepare"),
    (["bogus"], 2, "device-check: unknown command 'bogus'"),
    (["run", "--timeout-s"], 2, "device-check: --timeout-s needs a number of seconds"),
    (["run", "--timeout-s", "0"], 2, "device-check: --timeout-s must be a positive whole number, not '0'"),
    (["prepare", "--images", "many"], 2, "device-check: --images must be a whole number, not 'many'"),
    (["run", "--fast"], 2, "device-check: unknown argument '--fast' for run"),
    (["run"], 2, "device-check: no .device/wheels: run '.ci/device-check prepare' here first and carry .device"),
])
def test_device_check_arguments(device_check, argv, rc, needle):
    proc = subprocess.run(["bash", str(device_check), *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == rc, proc.stderr
    assert needle in (proc.stdout if rc == 0 else proc.stderr), (proc.stdout, proc.stderr)
    if rc == 2 and argv:
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _tiny_wheel(folder: Path) -> Path:
    """A pure-Python wheel (one module) made by hand: what the device gets from .device/wheels, in small."""
    import zipfile

    name = "progan_devicecheck_probe"
    path = folder / f"{name}-1.0-py3-none-any.whl"
    files = {f"{name}.py": "VALUE = 42\n",
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{name}-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{name}-1.0.dist-info/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{name}-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


@pytest.mark.slow
def test_device_check_run_on_a_bare_machine_without_cuda(tmp_path):
    """`.ci/device-check run` as on a lent device, here: a copy of the checkout with a .device/ of one wheel and the
    data, no .venv and no ../shared/data beside it, and a python3 of its own on PATH (a fresh venv that sees this
    one's packages, standing in for the device image's). It links .venv to that python's environment, installs the
    wheel and the project, links ../shared/data to .device/data, runs make test-gpu (every gpu test skips: no CUDA)
    and leaves the log, junit and summary in $OUT."""
    import sysconfig

    repo = tmp_path / "machine" / "repo"
    ignore = shutil.ignore_patterns(".venv", ".device", "__pycache__", "*.egg-info", "out", ".pytest_cache")
    for item in ("src", "tests", "bench", ".ci"):
        shutil.copytree(REPO / item, repo / item, ignore=ignore, symlinks=True)
    for item in ("Makefile", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / item, repo / item)
    (repo / ".device" / "wheels").mkdir(parents=True)
    _tiny_wheel(repo / ".device" / "wheels")
    (repo / ".device" / "data").symlink_to(REPO.parent / "shared" / "data")
    image = tmp_path / "image"
    subprocess.run([str(Path(sys.base_prefix) / "bin" / "python3"), "-m", "venv", str(image)], check=True, timeout=120)
    site = next((image / "lib").glob("python3*/site-packages"))
    (site / "zz_this_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    out = tmp_path / "OUT"
    out.mkdir()
    env = {**os.environ, "PATH": f"{image / 'bin'}{os.pathsep}{os.environ['PATH']}", "OUT": str(out),
           "CUDA_VISIBLE_DEVICES": ""}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(["bash", str(repo / ".ci" / "device-check"), "run", "--timeout-s", "200", "--",
                           "tests/test_cuda.py", "-k", "one_training_step and fp32"],
                          env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert (repo / ".venv").resolve() == image.resolve()
    assert (tmp_path / "machine" / "shared" / "data").resolve() == (REPO.parent / "shared" / "data").resolve()
    assert subprocess.run([str(image / "bin" / "python"), "-c", "import progan_devicecheck_probe, progan, sys; "
                           "sys.exit(0 if progan.__file__.startswith(sys.argv[1]) else 1)", str(repo)],
                          timeout=60).returncode == 0                    # the wheel and this copy's progan installed
    assert sorted(p.name for p in out.iterdir()) == ["device-check.log", "junit.xml", "summary.json", "test-gpu.log"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is True and summary["tests"]["counts"]["skipped"] == 2
    assert "make test-gpu exit status 0" in (out / "device-check.log").read_text()
