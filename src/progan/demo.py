"""`progan demo --folder DIR [--minutes N]`: the whole DAG to 32 px with small nets, offline, on the CPU.

Writes `<workdir>/params.yaml` (the base preset with workflow/params.demo.yaml's differences put in, `data.folder` set
to DIR) and runs `snakemake --cores all` there against the checkout's Snakefile. Re-running continues where it
stopped.

The demo's schedule is sized for about two minutes on a 2-core CPU, with the lr that bench/bench_quality.py found
to learn fastest there over its 14 kimg (see params.demo.yaml's header). `--minutes N` stretches it: the kimg of
every phase grow by the time left after the fixed costs (start-up, crop, evaluations, report: DEMO_FIXED_S), so 20
minutes give recognisable 32 px faces; from LONG_MIN minutes on it also uses every image of the folder (more faces,
less memorising, at ~15 s of cropping per 1,000 images) and the official lr (measured over such lengths; the
demo's was not). Its default workdir is `demo-<N>min`.
Jobs run with one intra-op thread each (OMP_NUM_THREADS=1 unless set): the demo's small convolutions gain nothing
from a second thread, and two jobs side by side (train next to an evaluate) would fight over two cores.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from progan import params as params_mod, presets
from progan.errors import ProganError
from progan.fileio import write_text
from progan.pipeline import repo_root

DEMO_MINUTES = 2.0          # what params.demo.yaml is sized for
DEMO_FIXED_S = 50.0         # the demo's time outside training: snakemake start-up, crop, pyramid, evaluations, report
LONG_MIN = 10.0             # from this many minutes on: every image of the folder, and the official lr
OFFICIAL_LR = 0.001         # official config.py G_lrate / D_lrate (the demo's 0.003 was measured over 14 kimg only)


def template() -> str:
    """The demo's complete params text: workflow/params.demo.yaml, which holds what differs from the base preset."""
    return presets.expand((repo_root() / "workflow" / "params.demo.yaml").read_text(), "workflow/params.demo.yaml")


def stretch(template: str, minutes: float) -> str:
    """params.demo.yaml's text for a run of about `minutes`: every phase's kimg times the ratio of training time
    (minutes minus DEMO_FIXED_S) to the demo's own, rounded to 0.1 kimg; from LONG_MIN on also every image of the
    folder (more faces, less memorising) and the official lr. The comments are kept, a first line says what was
    stretched, and the header's numbers (images, kimg, lr) are the new ones."""
    if minutes < DEMO_MINUTES:
        raise ProganError(f"--minutes {minutes:g}: the demo takes about {DEMO_MINUTES:g} minutes at the least")
    factor = (minutes * 60 - DEMO_FIXED_S) / (DEMO_MINUTES * 60 - DEMO_FIXED_S)

    def scale(m: re.Match) -> str:
        return f"{m.group(1)}{round(float(m.group(2)) * factor, 1):g}"

    text = re.sub(r"((?:transition|stabilize)_kimg: )([0-9.]+)", scale, template)
    text = re.sub(r"(with )([0-9.]+)(?= kimg per fade-in and per stabilisation)", scale, text)
    stages = yaml.safe_load(text)["train"]["stages"].values()
    total_kimg = sum(s["transition_kimg"] + s["stabilize_kimg"] for s in stages)
    text = re.sub(r"\([0-9.]+ kimg in all", f"({total_kimg:g} kimg in all", text, count=1)
    what = f"every phase's kimg x{factor:.1f} ({total_kimg:g} kimg in all)"
    if minutes >= LONG_MIN:
        text = re.sub(r"(?m)^(  max_images:) [^#\n]*?(\s+#)", r"\1 null\2", text)
        text = re.sub(r"What it is: [0-9]+ images of a folder", "What it is: every image of a folder", text, count=1)
        text = re.sub(r"\blr: [0-9.e-]+,", f"lr: {OFFICIAL_LR:g},", text)
        text = re.sub(r"(minibatch [0-9]+, )lr [0-9.e-]+\)", rf"\g<1>lr {OFFICIAL_LR:g})", text, count=1)
        what += f", every image of the folder, the official lr {OFFICIAL_LR:g} (not the demo's, tuned over 14 kimg)"
    return textwrap.fill(f"STRETCHED by `progan demo --minutes {minutes:g}`: {what}.", 116, initial_indent="# ",
                         subsequent_indent="# ") + "\n" + text


def prepare(folder: str | Path, workdir: str | Path, minutes: float | None = None) -> Path:
    """Write workdir/params.yaml for the demo; return its path. An existing one is kept (resume)."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise ProganError(f"--folder {folder}: not a folder of images")
    workdir = Path(workdir)
    target = workdir / "params.yaml"
    text = template() if minutes is None else stretch(template(), minutes)
    text = re.sub(r"(?m)^(  folder:) [^#\n]*?(\s+#)", lambda m: f"{m.group(1)} {folder}{m.group(2)}", text)
    if target.exists() and target.read_text() != text:
        raise ProganError(f"{target} exists with other settings; remove it or pick another --workdir")
    params_mod.validate(yaml.safe_load(text), str(target))   # before anything is written
    workdir.mkdir(parents=True, exist_ok=True)
    write_text(target, text)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="progan demo", description=__doc__.split("\n")[0])
    parser.add_argument("--folder", required=True, help="folder of face images (e.g. ../shared/data/celeba-aligned-2k)")
    parser.add_argument("--minutes", type=float, default=None, metavar="N",
                        help=f"a longer run of about N minutes on a 2-core CPU (default: the {DEMO_MINUTES:g}-minute "
                             f"demo); 20 gives recognisable faces")
    parser.add_argument("--workdir", default=None, help="where params.yaml, data/, results/, mlflow.db go (default: "
                                                        "demo, or demo-<N>min with --minutes)")
    parser.add_argument("--cores", default="all", help="snakemake --cores (default: all)")
    args = parser.parse_args(argv)
    workdir = args.workdir or ("demo" if args.minutes is None else f"demo-{args.minutes:g}min")
    try:
        prepare(args.folder, workdir, args.minutes)
    except ProganError as e:
        print(f"progan demo: error: {e}", file=sys.stderr)
        return 1
    snakemake = shutil.which("snakemake") or str(Path(sys.executable).with_name("snakemake"))
    cmd = [snakemake, "--snakefile", str(repo_root() / "Snakefile"), "--directory", workdir, "--cores", args.cores]
    print("+ " + " ".join(cmd), file=sys.stderr)
    bin_dir = str(Path(sys.executable).parent)  # the rules call `progan`: make this environment's the one found
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.call(cmd, env=env)
