"""Where each stage reads and writes, relative to the project root (the folder of params.yaml).

The CLI changes into that folder before running a stage, so stage code uses these relative paths
directly. progan.pipeline builds the Snakemake rules and dvc.yaml from the same names.
"""
from __future__ import annotations

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
