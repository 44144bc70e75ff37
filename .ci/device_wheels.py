"""Wheels for the device machine (.ci/device-check prepare): every dependency `make test-gpu` needs that the device
image lacks (.ci/device-packages.txt), for CPython 3.12 on manylinux x86-64, into the folder given.

The project's dependencies (pyproject.toml) are resolved with this venv's pip (`pip install --dry-run --report`,
metadata only), minus what the gpu tests and benchmarks never run: dvc (no gpu test runs `dvc repro`), the SLURM
executor plugin, gdown (downloads), pulp (snakemake's optional ILP scheduler: 16 MB; without it snakemake schedules
greedily). The resolution runs under this Python (3.11): a dependency that only 3.12 pulls in would be missing.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOT_NEEDED = {"dvc", "snakemake-executor-plugin-slurm", "gdown", "pulp"}
PLATFORMS = ["manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return norm(re.split(r"[\s<>=!~;\[]", req, 1)[0])


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: .ci/device_wheels.py FOLDER", file=sys.stderr)
        return 2
    dest = Path(sys.argv[1])
    dest.mkdir(parents=True, exist_ok=True)
    present = {norm(line.strip()) for line in (REPO / ".ci" / "device-packages.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = [d for d in deps if requirement_name(d) not in NOT_NEEDED]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([*pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                        *wanted], check=True)
        resolved = [(norm(i["metadata"]["name"]), i["metadata"]["version"])
                    for i in json.loads(report.read_text())["install"]]
    missing = [(n, v) for n, v in resolved if n not in present and n not in NOT_NEEDED]
    print(f"device_wheels: {len(resolved)} packages resolved, {len(missing)} not in the device image", flush=True)
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    binary = subprocess.run([*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
                             "3.12", "--implementation", "cp", *platform_args, "-d", str(dest),
                             *[f"{n}=={v}" for n, v in missing]], capture_output=True, text=True)
    if binary.returncode != 0:          # some are sdists only (connection-pool): one by one, building those
        for n, v in missing:
            one = subprocess.run([*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
                                  "3.12", "--implementation", "cp", *platform_args, "-d", str(dest), f"{n}=={v}"],
                                 capture_output=True, text=True)
            if one.returncode != 0:
                subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "-w", str(dest), f"{n}=={v}"], check=True)
    for sdist in dest.glob("*.tar.gz"):
        sdist.unlink()
    have = {norm(w.name.split("-")[0]) for w in dest.glob("*.whl")}
    lost = [n for n, _ in missing if n not in have]
    if lost:
        print(f"device_wheels: no wheel for {', '.join(lost)}", file=sys.stderr)
        return 1
    print(f"device_wheels: {len(have)} wheels in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
