"""`progan demo` writes its params (the 2-minute demo, or `--minutes N` stretched) without running anything here: the
demo's own run is the README's first command (tests/test_workflow.py runs the same DAG on tiny settings)."""
from __future__ import annotations

import pytest
import yaml

from progan import demo, params as params_mod
from progan.errors import ProganError

from helpers import CELEBA_DIR, REPO


def _stages(p):
    return {r: (p.stage(r).transition_kimg, p.stage(r).stabilize_kimg) for r in p.resolutions}


def test_the_two_minute_demo_params(tmp_path):
    path = demo.prepare(CELEBA_DIR, tmp_path / "demo")
    p = params_mod.load(path)
    template = (REPO / "workflow" / "params.demo.yaml").read_text()
    assert path.read_text().replace(str(CELEBA_DIR.resolve()), "FOLDER") == template.replace(
        yaml.safe_load(template)["data"]["folder"], "FOLDER", 1)
    assert p.data.folder == str(CELEBA_DIR.resolve()) and p.crop.size == 32 and p.resolutions == [4, 8, 16, 32]
    # what the 2-minute demo computes: SWD and MS-SSIM; no Inception (a 95 MB download, minutes of CPU)
    assert list(p.evaluate.metrics) == ["swd", "msssim"]
    assert demo.prepare(CELEBA_DIR, tmp_path / "demo") == path                  # the same again: kept (resume)


def test_minutes_stretches_every_phase_and_keeps_the_comments(tmp_path):
    base = params_mod.load(demo.prepare(CELEBA_DIR, tmp_path / "a"))
    path = demo.prepare(CELEBA_DIR, tmp_path / "b", minutes=20)
    long = params_mod.load(path)
    factor = (20 * 60 - demo.DEMO_FIXED_S) / (demo.DEMO_MINUTES * 60 - demo.DEMO_FIXED_S)
    for r, (tr, st) in _stages(base).items():
        assert _stages(long)[r] == (round(tr * factor, 1), round(st * factor, 1)), r
    assert long.data.max_images is None and base.data.max_images is not None    # every face from 10 minutes on
    assert params_mod.load(demo.prepare(CELEBA_DIR, tmp_path / "c", minutes=5)).data.max_images == base.data.max_images
    text = path.read_text()
    assert text.startswith("# progan-pipeline DEMO params (progan demo --minutes 20: every phase x")
    assert text.count("#") == (REPO / "workflow" / "params.demo.yaml").read_text().count("#")
    with pytest.raises(ProganError, match=r"--minutes 1: the demo takes about 2 minutes at the least"):
        demo.prepare(CELEBA_DIR, tmp_path / "d", minutes=1)
    with pytest.raises(ProganError, match=r"exists with other settings; remove it or pick another --workdir"):
        demo.prepare(CELEBA_DIR, tmp_path / "b", minutes=30)


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--minutes N" in out and "demo-<N>min" in out
