"""progan report on realistic stage outputs (real PNGs, TSVs, JSONs, a tiny real checkpoint), checked in
headless Chromium and read back from the MLflow parent run."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from progan import params as params_mod
from progan import checkpoint, paths, tracking
from progan.errors import ProganError
from progan.pictures import image_grid
from progan.report import html, plots
import progan
import progan.report as report

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
SCREENSHOT_DIR = os.environ.get("PROGAN_TEST_SCREENSHOT_DIR")   # keep the screenshot for a look
RES = [4, 8, 16]
GRID = 16
STEPS = 6
LOSS_COLUMNS = ["total_kimg", "stage_kimg", "phase", "alpha", "d_loss", "g_loss", "gp", "d_real", "d_fake",
                "img_s", "seconds"]
# Per stage: SWD x1e3 per level (one level at 4 and 8 px, as metrics/swd.py), floor, MS-SSIM.
EVALS = {
    4: {"swd": {"swd_4": 80.0, "swd_avg": 80.0}, "rr": {"swd_4": 2.0, "swd_avg": 2.0}, "ms": (None, None)},
    8: {"swd": {"swd_8": 40.0, "swd_avg": 40.0}, "rr": {"swd_8": 3.0, "swd_avg": 3.0}, "ms": (0.31, 0.27)},
    16: {"swd": {"swd_16": 20.0, "swd_avg": 20.0}, "rr": {"swd_16": 4.0, "swd_avg": 4.0}, "ms": (0.25, 0.22)},
}


def faces(n: int, res: int, seed: int) -> np.ndarray:
    """uint8 [n, res, res, 3]: a skin-coloured ellipse with two dark eyes on a random background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res] / res
    out = np.empty((n, res, res, 3), np.uint8)
    for i in range(n):
        img = np.broadcast_to(rng.uniform(0, 255, 3), (res, res, 3)).copy()
        face = ((xx - 0.5) / 0.33) ** 2 + ((yy - 0.52) / 0.42) ** 2 < 1
        img[face] = rng.uniform([180, 120, 90], [240, 190, 160])
        for ex in (0.38, 0.62):
            img[((xx - ex) ** 2 + (yy - 0.45) ** 2) < 0.004] = 40
        out[i] = np.clip(img + rng.normal(0, 6, img.shape), 0, 255)
    return out


def write_params(root: Path) -> Path:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["crop"]["size"] = RES[-1]
    data["train"]["stages"] = {str(r): {"batch": 4, "lr": 0.001, "transition_kimg": 0 if r == 4 else 0.2,
                                        "stabilize_kimg": 0.2} for r in RES}
    data["report"] = {"grid_images": GRID, "interpolation_steps": STEPS}
    data["model"].update(latent_dim=16, fmap_base=64, fmap_max=16, mbstd_group_size=4)
    data["mlflow"] = {"tracking_uri": "sqlite:///mlflow.db", "experiment": "progan-report-test"}
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root / "params.yaml"


def write_stage_outputs(root: Path) -> None:
    """What train and evaluate leave behind, in their formats (train/loop.py, evaluate.py)."""
    (root / paths.PYRAMID_DIR).mkdir(parents=True, exist_ok=True)
    np.save(root / paths.pyramid_level(RES[-1]), faces(40, RES[-1], seed=1))
    total = 0.0
    for r in RES:
        d = root / paths.stage_dir(r)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_grid(faces(GRID, r, seed=r))).save(d / "samples.png")
        rows, start = [], total
        for tick in range(1, 5):                        # 4 ticks of 0.1 kimg
            stage_kimg = 0.1 * tick
            alpha = 1.0 if r == 4 else min(1.0, stage_kimg / 0.2)
            phase = "transition" if alpha < 1 else "stabilize"
            rows.append([f"{start + stage_kimg:.6g}", f"{stage_kimg:.6g}", phase, f"{alpha:.6g}",
                         f"{-2.0 / tick:.6g}", f"{3.0 / tick:.6g}", "0.5", "1.5", "-0.5", "120", f"{tick * 0.8:.6g}"])
        total = start + 0.4
        (d / "losses.tsv").write_text("\n".join("\t".join(x) for x in [LOSS_COLUMNS, *rows]) + "\n")
        (d / "train.json").write_text(f'{{"res_px": {r}, "total_kimg": {total:.6g}, "seconds": {60.0 * r}, '
                                      f'"img_per_s": {1000.0 / r}}}')
        e = EVALS[r]
        ev = {"res_px": r, "num_images": 40, "swd": e["swd"], "swd_real_vs_real": e["rr"],
              "msssim_fake": e["ms"][0], "msssim_real": e["ms"][1], "seconds": 30.0}
        if r == 16:     # as with evaluate.fid.min_res_px 16: FID and KID of 40 fakes at 16 px, a note below it
            ev.update(fid40=55.5, kid40=0.0425, kid40_std=0.004, notes=[], metrics=["swd", "msssim", "fid", "kid"],
                      inception={"metrics": ["fid", "kid"], "num_fakes": 40, "num_reals": 40})
        else:
            ev["notes"] = [f"fid, kid: not computed at {r} px (below evaluate.fid.min_res_px 16)"]
        (d / "eval.json").write_text(json.dumps(ev))
    write_checkpoint(root)


def write_checkpoint(root: Path) -> None:
    torch = pytest.importorskip("torch")
    networks = pytest.importorskip("progan.model.networks")
    cfg = networks.ModelConfig(latent_dim=16, fmap_base=64, fmap_max=16)
    torch.manual_seed(0)
    G = networks.Generator(cfg, RES[-1])
    torch.save({"format": checkpoint.GENERATOR, "version": checkpoint.VERSION, "res_px": RES[-1],
                "model": dataclasses.asdict(cfg), "G_ema": G.state_dict(), "alpha": 1.0},
               root / paths.checkpoint(RES[-1]))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One report built for the module's checks (the slow parts: torch, matplotlib, MLflow)."""
    mp = pytest.MonkeyPatch()
    for var in ("MLFLOW_TRACKING_URI", tracking.PARENT_ENV, "RANK"):
        mp.delenv(var, raising=False)
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    root = tmp_path_factory.mktemp("report") / "proj"
    p = params_mod.load(write_params(root))
    write_stage_outputs(root)
    report.run(p)
    yield p
    mp.undo()


def make_project(tmp_path) -> "params_mod.Params":
    p = params_mod.load(write_params(tmp_path / "proj"))
    write_stage_outputs(p.root)
    return p


# ---- math and small pieces --------------------------------------------------------------------------

def test_interpolation_strip_rows_are_progan_interpolate_frames(tmp_path):
    """One slerp: row r of the report's strip is, frame for frame, what `progan interpolate --seeds A,B
    --steps <steps - 1>` renders for the seeds the caption names."""
    import io

    from progan import generate

    (tmp_path / paths.stage_dir(RES[-1])).mkdir(parents=True)
    write_checkpoint(tmp_path)
    ckpt = tmp_path / paths.checkpoint(RES[-1])
    png, caption = report.interpolation_strip(tmp_path, RES[-1], STEPS, seed=5)
    assert report.strip_seeds(5) == [(5, 6), (7, 8), (9, 10)] and caption.endswith("--seeds A,B` with A,B = 5,6 / 7,8 / 9,10")
    strip = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    pad, cell = max(1, RES[-1] // 16), RES[-1]
    for row, (a, b) in enumerate(report.strip_seeds(5)):
        gif = tmp_path / f"walk{row}.gif"
        assert generate.interpolate(ckpt, gif, [a, b], steps=STEPS - 1, device="cpu") == STEPS
        frames = progan.load_generator(ckpt).interpolate([a, b], STEPS - 1)
        for i, frame in enumerate(frames):
            y, x = row * (cell + pad), i * (cell + pad)
            assert np.array_equal(strip[y:y + cell, x:x + cell], frame), (row, i)


def test_html_fmt_and_escape():
    assert html.fmt(None) == "n/a" and html.fmt(0.123456) == "0.1235" and html.fmt("<b>") == "&lt;b&gt;"
    assert (html.duration(7.4), html.duration(270), html.duration(11520), html.duration(None)) == \
        ("7 s", "4.5 min", "3.2 h", "n/a")


# ---- the built report -------------------------------------------------------------------------------

def test_dvc_plot_files(built):
    swd = (built.root / paths.REPORT_SWD_PLOT).read_text().splitlines()
    assert swd[0].split("\t") == ["res_px", "swd_avg", "swd_real_vs_real_avg", "msssim_fake", "msssim_real",
                                  "swd_16", "swd_8", "swd_4", "fid40", "kid40", "kid40_std"]
    assert swd[1].split("\t") == ["4", "80", "2", "", "", "", "", "80", "", "", ""]
    assert swd[3].split("\t") == ["16", "20", "4", "0.25", "0.22", "20", "", "", "55.5", "0.0425", "0.004"]
    losses = [line.split("\t") for line in (built.root / paths.REPORT_LOSS_PLOT).read_text().splitlines()]
    assert losses[0] == ["res_px"] + LOSS_COLUMNS
    assert len(losses) == 1 + 4 * len(RES)
    assert [row[0] for row in losses[1:]] == [str(r) for r in RES for _ in range(4)]
    assert losses[5][1:5] == ["0.5", "0.1", "transition", "0.5"]          # stage 8, first tick


def test_summary_in_mlflow_parent(built):
    from mlflow import MlflowClient

    state = (built.root / tracking.PARENT_FILE).read_text()
    run_id = re.search(r'"run_id": "(\w+)"', state).group(1)
    run = MlflowClient(tracking_uri=tracking.tracking_uri(built)).get_run(run_id)
    m = run.data.metrics
    assert (m["swd_avg_r4"], m["swd_avg_r8"], m["swd_avg_r16"]) == (80.0, 40.0, 20.0)
    assert m["swd_real_vs_real_avg_r16"] == 4.0 and m["msssim_fake_r16"] == 0.25
    assert "msssim_fake_r4" not in m                     # None in eval.json: not logged
    assert (m["fid40_r16"], m["kid40_r16"], m["kid40_std_r16"]) == (55.5, 0.0425, 0.004)
    assert "fid40_r8" not in m
    assert run.info.status == "FINISHED"


def test_page_content(built):
    page = (built.root / paths.REPORT_HTML).read_text()
    for r in RES:
        assert f'id="stage-{r}"' in page
    assert page.count("<img ") == 6 + len(RES)   # reals, final samples, strip, 3 plots, one grid per stage
    assert "<th>fid40</th><th>kid40</th>" in page and "<td>55.5</td>" in page
    assert "8\u00d78: fid, kid: not computed at 8 px (below evaluate.fid.min_res_px 16)" in page
    assert "src=\"http" not in page and "<link" not in page     # self-contained
    assert "train.stages.16.lr" in page and "interpolation_steps" in page


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium not installed (CI installs it)")
def test_page_in_headless_chromium(built, tmp_path):
    assert CHROMIUM, "CI must have chromium"
    page = (built.root / paths.REPORT_HTML).resolve()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--virtual-time-budget=10000"]

    def chromium(*args):
        profile = tmp_path / f"profile{len(list(tmp_path.iterdir()))}"
        return subprocess.run([CHROMIUM, *flags, f"--user-data-dir={profile}", *args, page.as_uri()],
                              capture_output=True, text=True, timeout=120)

    dom = chromium("--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    assert 'data-broken-images="0"' in body, body
    assert f'data-images="{6 + len(RES)}"' in body, body
    for r in RES:
        assert f'id="stage-{r}"' in dom.stdout
    shot = Path(SCREENSHOT_DIR or tmp_path) / "report.png"
    out = chromium(f"--screenshot={shot}", "--window-size=1280,2600", "--hide-scrollbars")
    assert out.returncode == 0 and shot.is_file(), out.stderr[-2000:]
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"))
    assert pixels.shape == (2600, 1280) and pixels.std() > 10   # not a blank page


# ---- bad input: one line naming the file and the command -------------------------------------------

def test_missing_eval_names_file_and_command(tmp_path):
    p = make_project(tmp_path)
    (p.root / paths.eval_json(8)).unlink()
    with pytest.raises(ProganError, match=r"^results/8/eval.json: not found; run `progan evaluate --res 8 "):
        report.run(p)
    assert not (p.root / paths.REPORT_HTML).exists()            # nothing half-written


def test_bad_inputs(tmp_path):
    p = make_project(tmp_path)
    tsv = p.root / paths.losses_tsv(16)
    good = tsv.read_text()
    tsv.write_text(good.replace("\t120\t", "\tfast\t", 1))
    with pytest.raises(ProganError, match=r"results/16/losses.tsv: line 2 column img_s: 'fast' is not a number"):
        report.run(p)
    tsv.write_text(good)
    (p.root / paths.samples_png(4)).write_bytes(b"GIF89a")
    with pytest.raises(ProganError, match=r"results/4/samples.png: not a readable PNG.*progan train --res 4"):
        report.run(p)
    Image.fromarray(faces(4, 4, 0)[0]).save(p.root / paths.samples_png(4))
    (p.root / paths.pyramid_level(16)).unlink()
    with pytest.raises(ProganError, match=r"data/pyramid/16.npy: not found; run `progan pyramid"):
        report.run(p)
