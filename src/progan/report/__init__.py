"""`progan report`: one self-contained HTML page for the whole run -> results/report/index.html.

Reads, for every stage R in 4, 8, ..., crop.size: results/R/{samples.png, losses.tsv, train.json,
eval.json}; for the final stage also results/R/checkpoint.pt (G_ema, for a latent interpolation strip)
and data/pyramid/R.npy (real images shown beside the generated ones). Everything is checked before
any work; a missing or unreadable input is a ProganError naming the file and the command that makes it.

Writes (atomically) the page with every image embedded as base64, the DVC plots files
results/report/swd.tsv (one row per stage) and results/report/losses.tsv (every stage's rows, with a
res_px column), the page's loss and SWD curves as PNG files (for Snakemake's report and MLflow), then logs
the headline metrics (progan.headline: `swd_avg_r16`, ..., the names of `dvc exp show`), and the page to the
MLflow parent run (progan.tracking; never fails the report).
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from progan import headline, paths, pipeline, tracking
from progan.errors import ProganError
from progan.fileio import write_bytes, write_text
from progan.pictures import image_grid
from progan.log import log
from progan.report import html, plots

STRIP_ROWS = 3                      # interpolation strips (pairs of end latents) on the page
REQUIRED_LOSS_COLUMNS = ("total_kimg", "alpha", "d_loss", "g_loss")


@dataclass(frozen=True)
class StageResult:
    """What one training stage left in results/<res_px>/."""
    res_px: int
    losses: dict[str, list]         # losses.tsv column -> values (float, or str for `phase`)
    loss_header: list[str]
    loss_rows: list[list[str]]      # the TSV cells as written (copied to the DVC plots file unchanged)
    train: dict                     # train.json
    eval: dict                      # eval.json
    samples_png: bytes              # samples.png (the fixed-latent grid)


def _make(res: int | None, job: str) -> str:
    return f"run `{pipeline.command(job, res)}` (or the whole pipeline: snakemake / dvc repro)"


def _read(root: Path, rel: str, res: int | None, job: str) -> bytes:
    try:
        return (root / rel).read_bytes()
    except FileNotFoundError:
        raise ProganError(f"{rel}: not found; {_make(res, job)}") from None
    except OSError as e:
        raise ProganError(f"{rel}: cannot read ({e.strerror}); {_make(res, job)}") from None


def _json(root: Path, rel: str, res: int, job: str, required: tuple[str, ...]) -> dict:
    try:
        obj = json.loads(_read(root, rel, res, job))
    except ValueError as e:
        raise ProganError(f"{rel}: not valid JSON ({e}); {_make(res, job)}") from None
    missing = [k for k in required if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise ProganError(f"{rel}: missing key {missing[0]!r}; {_make(res, job)}")
    return obj


def _losses(root: Path, res: int) -> tuple[list[str], list[list[str]], dict[str, list]]:
    rel = paths.losses_tsv(res)
    text = _read(root, rel, res, "train").decode("utf-8", errors="replace")
    rows = [r for r in csv.reader(io.StringIO(text), delimiter="\t") if r]
    if not rows:
        raise ProganError(f"{rel}: empty (no header); {_make(res, 'train')}")
    header, body = rows[0], rows[1:]
    missing = [c for c in REQUIRED_LOSS_COLUMNS if c not in header]
    if missing:
        raise ProganError(f"{rel}: no column {missing[0]!r} in the header; {_make(res, 'train')}")
    columns: dict[str, list] = {name: [] for name in header}
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ProganError(f"{rel}: line {line} has {len(row)} cells, the header {len(header)}; {_make(res, 'train')}")
        for name, cell in zip(header, row):
            if name == "phase":
                columns[name].append(cell)
                continue
            try:
                columns[name].append(float(cell))
            except ValueError:
                raise ProganError(f"{rel}: line {line} column {name}: {cell!r} is not a number; "
                                  f"{_make(res, 'train')}") from None
    return header, body, columns


def _png(root: Path, rel: str, res: int, job: str) -> bytes:
    data = _read(root, rel, res, job)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
            if im.format != "PNG":
                raise ValueError(f"a {im.format} image")
    except Exception as e:
        raise ProganError(f"{rel}: not a readable PNG ({e}); {_make(res, job)}") from None
    return data


def load_stage(root: Path, res: int) -> StageResult:
    header, body, columns = _losses(root, res)
    train = _json(root, paths.train_json(res), res, "train", ("seconds", "img_per_s"))
    ev = _json(root, paths.eval_json(res), res, "evaluate", ("swd", "swd_real_vs_real"))
    if not isinstance(ev["swd"], dict) or "swd_avg" not in ev["swd"]:
        raise ProganError(f"{paths.eval_json(res)}: swd has no swd_avg; {_make(res, 'evaluate')}")
    samples = _png(root, paths.samples_png(res), res, "train")
    return StageResult(res, columns, header, body, train, ev, samples)


def load_reals(root: Path, res: int, count: int, seed: int) -> np.ndarray:
    """`count` real images uint8 [n, res, res, 3] from the pyramid level, a seeded sample (sorted)."""
    rel = paths.pyramid_level(res)
    if not (root / rel).is_file():
        raise ProganError(f"{rel}: not found; {_make(None, 'pyramid')}")
    try:
        level = np.load(root / rel, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise ProganError(f"{rel}: not a readable .npy ({e}); {_make(None, 'pyramid')}") from None
    if level.dtype != np.uint8 or level.ndim != 4 or level.shape[1:] != (res, res, 3) or len(level) == 0:
        raise ProganError(f"{rel}: expected uint8 [N, {res}, {res}, 3] with N >= 1, got {level.dtype} "
                          f"{list(level.shape)}; {_make(None, 'pyramid')}")
    n = min(int(count), len(level))
    index = np.sort(np.random.default_rng(seed).choice(len(level), size=n, replace=False))
    return np.asarray(level[index])


def strip_seeds(seed: int) -> list[tuple[int, int]]:
    """The (first, last) latent seeds of each row of the interpolation strip: params.seed + 0 / 1, + 2 / 3, ..."""
    return [(seed + 2 * row, seed + 2 * row + 1) for row in range(STRIP_ROWS)]


def interpolation_strip(root: Path, res: int, steps: int, seed: int) -> tuple[bytes | None, str]:
    """PNG of STRIP_ROWS rows x `steps` frames: G_ema of the final stage walking the latent sphere between the
    seeds of `strip_seeds`, row by row the frames of `progan interpolate --seeds A,B --steps <steps - 1>` (the same
    latents, slerp and uint8 conversion: progan.api). Returns (PNG, caption), or (None, why) when torch is not there."""
    try:
        from progan import api
    except ImportError as e:
        return None, f"interpolation strip left out: {e}"
    rel = paths.checkpoint(res)
    if not (root / rel).is_file():
        raise ProganError(f"{rel}: not found; {_make(res, 'train')}")
    G = api.load_generator(root / rel, device="cpu")   # the report takes no GPU lease (progan.gpus): a few images
    rows = strip_seeds(seed)
    images = np.concatenate([G.interpolate(list(ends), steps - 1) for ends in rows])   # [rows * steps, R, R, C]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    caption = (f"G_ema of the final stage walking the latent sphere (slerp) from one seed's latent to another's, "
               f"{steps} frames per row; each row is `progan interpolate --checkpoint {rel} --steps {steps - 1} "
               f"--seeds A,B` with A,B = " + " / ".join(f"{a},{b}" for a, b in rows))
    return plots.png_bytes(image_grid(images, columns=steps, pad_px=max(1, res // 16), fill=255)), caption


def _tsv(header: list[str], rows: list[list]) -> str:
    return "".join("\t".join(map(str, r)) + "\n" for r in [header, *rows])


def inception_keys(stages: list[StageResult]) -> list[str]:
    """The FID / KID / IS keys any stage's eval.json holds (fid50k, kid50k, kid50k_std, ...), first seen first."""
    keys: list[str] = []
    for s in stages:
        keys += [k for k in s.eval
                 if headline.INCEPTION_KEY.match(k) and isinstance(s.eval[k], (int, float)) and k not in keys]
    return keys


def swd_table(stages: list[StageResult]) -> tuple[list[str], list[list]]:
    """One row per stage: res_px, swd_avg, floor, MS-SSIM, each level px, then FID / KID / IS where computed
    (blank where a stage has none: no such level, or a stage below evaluate.fid.min_res_px)."""
    levels = sorted({int(k[4:]) for s in stages for k in s.eval["swd"] if k != "swd_avg"}, reverse=True)
    extra = inception_keys(stages)
    header = ["res_px", "swd_avg", "swd_real_vs_real_avg", "msssim_fake", "msssim_real"]
    header += [f"swd_{lv}" for lv in levels] + extra
    rows = []
    for s in stages:
        ev = s.eval
        cells = [s.res_px, ev["swd"]["swd_avg"], ev["swd_real_vs_real"].get("swd_avg", ""),
                 ev.get("msssim_fake"), ev.get("msssim_real")]
        cells += [ev["swd"].get(f"swd_{lv}", "") for lv in levels] + [ev.get(k, "") for k in extra]
        rows.append(["" if c is None else (f"{c:.6g}" if isinstance(c, float) else c) for c in cells])
    return header, rows


def losses_table(stages: list[StageResult]) -> tuple[list[str], list[list]]:
    """Every stage's losses.tsv rows under one header, res_px first (columns a stage lacks are blank)."""
    header = ["res_px"]
    for s in stages:
        header += [c for c in s.loss_header if c not in header]
    rows = []
    for s in stages:
        at = {c: i for i, c in enumerate(s.loss_header)}
        rows += [[s.res_px] + [row[at[c]] if c in at else "" for c in header[1:]] for row in s.loss_rows]
    return header, rows


def summary_metrics(stages: list[StageResult]) -> dict[str, float]:
    """What the MLflow parent run gets, per stage: the headline numbers (progan.headline: the DVC metrics, same
    names: swd_avg_r64, swd_16px_r64, msssim_fake_r64, fid50k_r64, d_loss_r64, img_per_s_r64, ...), plus the
    real-vs-real floor, MS-SSIM of the reals, the KID / IS spreads and the training seconds."""
    out: dict[str, float] = {}
    for s in stages:
        r = s.res_px
        out.update(headline.evaluation(s.eval))
        out.update(headline.training(s.train))
        if "swd_avg" in s.eval["swd_real_vs_real"]:
            out[f"swd_real_vs_real_avg_r{r}"] = float(s.eval["swd_real_vs_real"]["swd_avg"])
        for key in ("msssim_real", *(k for k in inception_keys([s]) if k.endswith("_std"))):
            if s.eval.get(key) is not None:
                out[f"{key}_r{r}"] = float(s.eval[key])
        out[f"train_seconds_r{r}"] = float(s.train["seconds"])
    return out


def run(params) -> None:
    root = Path(params.root)
    resolutions = params.resolutions
    final = resolutions[-1]
    stages = [load_stage(root, r) for r in resolutions]
    reals = load_reals(root, final, int(params.report.grid_images), int(params.seed))
    if not (root / paths.checkpoint(final)).is_file():
        raise ProganError(f"{paths.checkpoint(final)}: not found; {_make(final, 'train')}")
    log.info("report: %d stages (%s px), writing %s", len(stages), ", ".join(map(str, resolutions)),
             paths.REPORT_HTML)

    swd_header, swd_rows = swd_table(stages)
    loss_header, loss_rows = losses_table(stages)
    write_text(root / paths.REPORT_SWD_PLOT, _tsv(swd_header, swd_rows))
    write_text(root / paths.REPORT_LOSS_PLOT, _tsv(loss_header, loss_rows))

    figures = {
        "losses": plots.loss_curves([{"res_px": s.res_px, **{k: s.losses[k] for k in REQUIRED_LOSS_COLUMNS}}
                                     for s in stages]),
        "swd": plots.swd_msssim([{"res_px": s.res_px, "swd": s.eval["swd"], "floor": s.eval["swd_real_vs_real"],
                                  "msssim_fake": s.eval.get("msssim_fake"), "msssim_real": s.eval.get("msssim_real")}
                                 for s in stages]),
    }
    write_bytes(root / paths.REPORT_LOSS_PNG, figures["losses"])
    write_bytes(root / paths.REPORT_SWD_PNG, figures["swd"])
    inception = plots.inception_curves([{"res_px": s.res_px, **{k: s.eval[k] for k in inception_keys([s])}}
                                        for s in stages])
    if inception is not None:
        figures["inception"] = inception
    strip, strip_note = interpolation_strip(root, final, int(params.report.interpolation_steps), int(params.seed))
    page = html.page(params, stages, figures, plots.png_bytes(image_grid(reals)), strip, strip_note,
                     swd_header, swd_rows, inception_keys(stages))
    write_text(root / paths.REPORT_HTML, page)
    final_swd = ", ".join(f"{s.res_px}px {s.eval['swd']['swd_avg']:.3g}" for s in stages)
    log.info("report: wrote %s (%.1f MB); SWD avg x1e3 per stage: %s", paths.REPORT_HTML, len(page) / 1e6, final_swd)
    tracking.log_pipeline_summary(params, summary_metrics(stages),
                                  [str(root / p) for p in pipeline.artifacts(params, "report")])
