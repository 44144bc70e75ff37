"""`make test-gpu`: the `gpu` tests (tests/test_cuda.py and any other test marked `gpu`), then the figures of
`make bench-gpu`, in one command sized for one H100/H200 (issue #18): the tests get --tests-timeout-s, the
benchmarks what is left of --budget-s (each is killed at the budget's end and the ones after it are listed as not
run), so the whole ends inside the budget plus a few seconds.

Writes, under --out (default bench/out/gpu/): test-gpu.log (everything printed), junit.xml (pytest's), and
summary.json: date, machine, torch / CUDA / cuDNN versions, GPU name and memory, each gpu test's outcome (passed,
failed, skipped with its reason), each benchmark's status and the JSON figures it printed. The summary is written
however the run ends (no CUDA: every gpu test skipped, the benchmarks not run), rewritten after each step.
Exit status: 0 when no test failed and every benchmark that ran succeeded, 1 otherwise, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
import run_all  # noqa: E402

CELEBA = REPO.parent / "shared" / "data" / "celeba-aligned-2k"
GRACE_S = 20                     # after SIGINT, pytest's time to write its report before the group is killed


def machine() -> dict:
    import torch

    out = {"date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "host": platform.node(),
           "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
           "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "gpus": []}
    if torch.cuda.is_available():
        out["cudnn"] = torch.backends.cudnn.version()
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["gpus"].append({"name": p.name, "memory_GiB": round(p.total_memory / 2**30, 1),
                                "capability": f"{p.major}.{p.minor}"})
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        out["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        out["driver"] = None
    return out


def junit_outcomes(xml_path: Path) -> list[dict]:
    """[{test, outcome (passed/failed/error/skipped), seconds, message}] from pytest's junit XML."""
    if not xml_path.is_file():
        return []
    rows = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (el.get("message") or "").strip().splitlines()[0][:300] if el.get("message") else ""
                break
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        rows.append({"test": name, "outcome": outcome, "seconds": round(float(case.get("time") or 0), 2),
                     "message": message})
    return rows


def verbose_outcomes(lines: list[str]) -> list[dict]:
    """The outcomes pytest -v printed, for a run killed before it wrote the junit XML."""
    rows = []
    for line in lines:
        hit = re.match(r"(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", line)
        if hit:
            rows.append({"test": hit[1], "outcome": hit[2].lower(), "seconds": None, "message": ""})
    return rows


# The figures of `make bench-gpu` (run_all.GPU_RUNS, ~8 min on one H200 by itself), each cut to what fits beside
# the tests: fewer timed steps and resolutions, 4,096 images for SWD, 500 for MTCNN. --full-bench runs GPU_RUNS.
QUICK_GPU_RUNS = [    # bench_train: the old (before #17) and the new step interleaved, 2 rounds (each order once)
    ("training step, tiny + paper nets, fp32", ["bench_train.py", "--tiny-res", "4", "32", "--paper-res", "16", "64",
                                               "128", "--steps", "10", "--paper-steps", "5", "--reps", "2"]),
    ("training step, paper nets, bf16 autocast", ["bench_train.py", "--tiny-res", "--paper-res", "64", "128",
                                                  "--paper-steps", "5", "--reps", "2", "--amp"]),
    ("training step, paper nets, bf16 + channels_last", ["bench_train.py", "--tiny-res", "--paper-res", "128",
                                                         "--paper-steps", "5", "--reps", "2", "--amp",
                                                         "--channels-last"]),
    ("SWD 4,096 images at 128 px on the GPU", ["bench_swd.py", "--device", "cuda", "--images", "4096",
                                               "--ref-images", "256"]),
    ("crop (MTCNN on the GPU, CelebA)", ["bench_crop.py", "--device", "cuda", "--threads", "16", "--n", "500"]),
    ("crop (MTCNN on the GPU, photos x4)", ["bench_crop.py", "--device", "cuda", "--threads", "16", "--no-stage",
                                            "--images", "../shared/data/photos", "--upscale", "4"]),
    ("pyramid + loader", ["bench_data.py", "--n", "1000", "--size", "128", "--batches", "50"]),
]


def figure_runs(n_celeba: int, full: bool = False) -> list[tuple[str, list[str]]]:
    """The benchmark runs (QUICK_GPU_RUNS, or bench/run_all.py's GPU_RUNS when `full`), with --n no larger than the
    CelebA images present (a device that was given a subset of ../shared/data)."""
    runs = []
    for title, argv in run_all.GPU_RUNS if full else QUICK_GPU_RUNS:
        argv = list(argv)
        if "--n" in argv:
            i = argv.index("--n") + 1
            argv[i] = str(min(int(argv[i]), n_celeba))
        elif argv[0] in ("bench_crop.py", "bench_data.py") and "--images" not in argv:
            argv += ["--n", str(min(2010, n_celeba))]
        runs.append((title, argv))
    return runs


def run_figure(title: str, argv: list[str], timeout_s: float, log: Log) -> dict:
    """run_all.run_one, plus the JSON file the script wrote under bench/out/ during the run (bench_train and
    bench_data print only part of their figures), as `written`."""
    written = REPO / "bench" / "out" / (Path(argv[0]).stem + ".json")
    before = written.stat().st_mtime_ns if written.exists() else None
    result = run_all.run_one(title, argv, timeout_s=timeout_s, log=log)
    if written.exists() and written.stat().st_mtime_ns != before:
        try:
            result["written"] = json.loads(written.read_text())
        except ValueError:
            result["written"] = None
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "gpu", help="folder for the log and JSON")
    ap.add_argument("--budget-s", type=float, default=360, help="the whole run, tests and benchmarks (default 360)")
    ap.add_argument("--tests-timeout-s", type=float, default=240, help="the gpu tests at most (default 240)")
    ap.add_argument("--no-bench", action="store_true", help="the gpu tests only")
    ap.add_argument("--full-bench", action="store_true", help="make bench-gpu's full runs (~8 min) after the tests")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments after --, e.g. -- -k one_training_step "
                    "(a path under tests/ replaces tests/)")
    args = ap.parse_args(argv)
    if args.budget_s <= 0 or args.tests_timeout_s <= 0:
        ap.error("--budget-s and --tests-timeout-s must be positive")
    return args


class Log:
    """Echo to stdout and append to the log file."""

    def __init__(self, path: Path):
        self.file = path.open("w", encoding="utf-8")

    def write(self, text: str):
        sys.stdout.write(text)
        sys.stdout.flush()
        self.file.write(text)
        self.file.flush()

    def flush(self):
        self.file.flush()


def run_tests(args, log: Log, deadline: float) -> dict:
    junit = args.out / "junit.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rA", "-p", "no:cacheprovider", f"--junitxml={junit}",
           "-o", "junit_family=xunit1", *args.pytest_args]
    if not any(a.startswith("tests") for a in args.pytest_args):
        cmd.append("tests")
    log.write(f"=== gpu tests: {' '.join(cmd[1:])}\n")
    t0 = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    timeout = min(args.tests_timeout_s, max(1.0, deadline - time.time()))
    killed = []

    def stop():
        """SIGINT to pytest (it stops, reports and writes the junit XML), then SIGKILL to its whole group."""
        killed.append(True)
        try:
            os.kill(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            os.killpg(proc.pid, signal.SIGKILL)       # the progan / snakemake processes the tests started
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, stop)
    timer.daemon = True
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            log.write(line)
        rc = proc.wait()
    finally:
        timer.cancel()
    if killed:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    tests = junit_outcomes(junit) or verbose_outcomes(lines)
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    status = f"killed after {timeout:.0f} s" if killed else f"rc={rc}"
    log.write(f"=== gpu tests: {status} in {time.time() - t0:.0f} s: {counts}\n")
    return {"rc": None if killed else rc, "timed_out": bool(killed), "seconds": round(time.time() - t0, 1),
            "counts": counts, "tests": tests}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    deadline = t_start + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "test-gpu.log")
    summary_path = args.out / "summary.json"
    summary = {"command": "make test-gpu", "argv": sys.argv[1:] if argv is None else argv,
               "budget_s": args.budget_s, "machine": machine(), "tests": None, "benchmarks": []}

    def save():
        summary["seconds"] = round(time.time() - t_start, 1)
        tmp = summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(summary_path)

    m = summary["machine"]
    log.write(f"machine: {m['host']}, torch {m['torch']} (CUDA {m['cuda_build']}), "
              f"GPUs: {', '.join(g['name'] for g in m['gpus']) or 'none'}; {m['date_utc']}\n")
    save()
    summary["tests"] = run_tests(args, log, deadline)
    save()
    if args.no_bench:
        summary["benchmarks_note"] = "--no-bench"
    elif not (m["cuda_available"]):
        summary["benchmarks_note"] = "not run: no CUDA device (make bench-gpu needs one)"
        log.write(f"=== benchmarks: {summary['benchmarks_note']}\n")
    else:
        n_celeba = len(list(CELEBA.glob("*.jpg"))) if CELEBA.is_dir() else 0
        for title, bench_argv in figure_runs(n_celeba, args.full_bench):
            left = deadline - time.time()
            if left < 10:
                summary["benchmarks"].append({"title": title, "argv": bench_argv, "rc": None,
                                              "not_run": f"the {args.budget_s:.0f} s budget was spent"})
                log.write(f"=== {title}: not run, the budget was spent\n")
                continue
            summary["benchmarks"].append(run_figure(title, bench_argv, left, log))
            save()
    tests = summary["tests"]
    ran = [b for b in summary["benchmarks"] if "not_run" not in b]
    ok = tests["rc"] in (0, 5) and not tests["counts"]["failed"] and not tests["counts"]["error"] \
        and all(b["rc"] == 0 for b in ran)          # pytest 5: nothing collected (-k selected no gpu test)
    summary["ok"] = ok
    save()
    log.write(f"=== test-gpu: {'ok' if ok else 'FAILED'} in {time.time() - t_start:.0f} s; "
              f"tests {tests['counts']}; benchmarks {sum(b['rc'] == 0 for b in ran)}/{len(summary['benchmarks'])} "
              f"ok; summary {summary_path}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
