"""`progan demo --folder DIR`: the whole DAG to 32 px with tiny nets, offline, on the CPU, in minutes.

Writes `<workdir>/params.yaml` (workflow/params.demo.yaml with `data.folder` set to DIR) and runs
`snakemake --cores all` there against the checkout's Snakefile. Re-running continues where it stopped.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from progan import params as params_mod
from progan.errors import ProganError
from progan.fileio import write_text
from progan.pipeline import repo_root


def prepare(folder: str | Path, workdir: str | Path) -> Path:
    """Write workdir/params.yaml for the demo; return its path. An existing one is kept (resume)."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise ProganError(f"--folder {folder}: not a folder of images")
    workdir = Path(workdir)
    target = workdir / "params.yaml"
    template = (repo_root() / "workflow" / "params.demo.yaml").read_text()
    text = re.sub(r"(?m)^(  folder:) [^#\n]*?(\s+#)", lambda m: f"{m.group(1)} {folder}{m.group(2)}", template)
    if target.exists() and target.read_text() != text:
        raise ProganError(f"{target} exists with other settings; remove it or pick another --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    write_text(target, text)
    params_mod.load(target)  # validate now, not in the middle of the run
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="progan demo", description=__doc__.split("\n")[0])
    parser.add_argument("--folder", required=True, help="folder of face images (e.g. ../shared/data/celeba-aligned-2k)")
    parser.add_argument("--workdir", default="demo", help="where params.yaml, data/, results/, mlflow.db go (default: demo)")
    parser.add_argument("--cores", default="all", help="snakemake --cores (default: all)")
    args = parser.parse_args(argv)
    try:
        prepare(args.folder, args.workdir)
    except ProganError as e:
        print(f"progan demo: error: {e}", file=sys.stderr)
        return 1
    snakemake = shutil.which("snakemake") or str(Path(sys.executable).with_name("snakemake"))
    cmd = [snakemake, "--snakefile", str(repo_root() / "Snakefile"), "--directory", args.workdir,
           "--cores", args.cores]
    print("+ " + " ".join(cmd), file=sys.stderr)
    bin_dir = str(Path(sys.executable).parent)  # the rules call `progan`: make this environment's the one found
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.call(cmd, env=env)
