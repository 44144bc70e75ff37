"""Where each stage reads and writes, relative to the project root (the folder of params.yaml).

The CLI changes into that folder before running a stage, so stage code uses these relative paths
directly. progan.pipeline builds the Snakemake rules and dvc.yaml from the same names.

Source image paths in the stage lists (images.tsv, the crop manifest) are UTF-8 text whatever the file names
are: `listed_path` writes a byte that is not UTF-8 (a Latin-1 `caf\xe9.jpg` from an old archive), a control
character (tab, newline) and `%` itself as %XX, and `local_path` reads it back (urllib's percent-encoding).
"""
from __future__ import annotations

import os
import re
from urllib.parse import unquote_to_bytes

RAW_DIR = "data/raw"                      # downloads and extracted archives
IMAGES_LIST = "data/raw/images.tsv"       # download's output: one source image per row (path, bytes)
FACES_DIR = "data/faces"                  # crop's output folder
FACES_IMAGES_DIR = "data/faces/images"    # kept crops, crop.size px PNG, numbered in manifest order
FACES_MANIFEST = "data/faces/manifest.csv"  # every input image: status, reason, score, box, landmarks
PYRAMID_DIR = "data/pyramid"
PYRAMID_INFO = "data/pyramid/pyramid.json"
FID_STATS_DIR = "data/fid-stats"           # the reals' Inception statistics, one file per resolution
RESULTS_DIR = "results"
REPORT_DIR = "results/report"
REPORT_HTML = "results/report/index.html"
REPORT_SWD_PLOT = "results/report/swd.tsv"        # DVC plots: SWD per level across stages
REPORT_LOSS_PLOT = "results/report/losses.tsv"    # DVC plots: losses of every stage vs total kimg
REPORT_LOSS_PNG = "results/report/losses.png"     # the page's loss curves, as a file (Snakemake's report, MLflow)
REPORT_SWD_PNG = "results/report/swd.png"         # the page's SWD / MS-SSIM curves across stages, as a file
STATE_DIR = ".progan"                     # run-local state outside declared outputs (locks, MLflow parent id)


# `%`, C0 controls and DEL, and the surrogates os.fsdecode makes of bytes that are not UTF-8 (U+DC80..U+DCFF)
_ESCAPED = re.compile("[%\x00-\x1f\x7f\udc80-\udcff]")


def listed_path(path: str | os.PathLike) -> str:
    """A file path as the stage lists write it: valid UTF-8 on one line, `local_path` gives the path back."""
    return _ESCAPED.sub(lambda m: f"%{os.fsencode(m.group())[0]:02X}", os.fspath(path))


def local_path(listed: str) -> str:
    """The file path of a `listed_path` text (str, with surrogates for bytes that are not UTF-8, as os.listdir)."""
    return os.fsdecode(unquote_to_bytes(listed)) if "%" in listed else listed


def pyramid_level(res_px: int) -> str:
    return f"{PYRAMID_DIR}/{res_px}.npy"


def fid_stats(res_px: int) -> str:
    """The reals' Inception statistics of level `res_px` (metrics/real_stats.py; the fid-stats@<R> stage)."""
    return f"{FID_STATS_DIR}/{res_px}.npz"


def stage_dir(res_px: int) -> str:
    return f"{RESULTS_DIR}/{res_px}"


def checkpoint(res_px: int) -> str:
    return f"{stage_dir(res_px)}/checkpoint.pt"


def train_json(res_px: int) -> str:
    return f"{stage_dir(res_px)}/train.json"


def train_metrics_json(res_px: int) -> str:
    """The few numbers of train.json people compare (progan.headline): a DVC metrics file."""
    return f"{stage_dir(res_px)}/train_metrics.json"


def losses_tsv(res_px: int) -> str:
    return f"{stage_dir(res_px)}/losses.tsv"


def samples_png(res_px: int) -> str:
    return f"{stage_dir(res_px)}/samples.png"


def eval_json(res_px: int) -> str:
    return f"{stage_dir(res_px)}/eval.json"


def eval_metrics_json(res_px: int) -> str:
    """The few numbers of eval.json people compare (progan.headline): a DVC metrics file."""
    return f"{stage_dir(res_px)}/eval_metrics.json"


def resume_dir(res_px: int) -> str:
    """Mid-stage snapshots, outside the declared outputs so DVC/Snakemake never delete them mid-run."""
    return f"{stage_dir(res_px)}/.resume"
