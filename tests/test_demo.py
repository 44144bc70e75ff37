"""`progan demo` writes its params (the 2-minute demo, or `--minutes N` stretched) without running anything here: the
demo's own run is the README's first command (tests/test_workflow.py runs the same DAG on tiny settings)."""
from __future__ import annotations

import pytest
import yaml

from progan import demo, params as params_mod
from progan.errors import ProganError

from helpers import CELEBA_DIR


def _stages(p):
    return {r: (p.stage(r).transition_kimg, p.stage(r).stabilize_kimg) for r in p.resolutions}


def test_the_two_minute_demo_params(tmp_path):
    path = demo.prepare(CELEBA_DIR, tmp_path / "demo")
    p = params_mod.load(path)
    template = demo.template()
    assert path.read_text().replace(str(CELEBA_DIR.resolve()), "FOLDER") == template.replace(
        yaml.safe_load(template)["data"]["folder"], "FOLDER", 1)
    assert p.data.folder == str(CELEBA_DIR.resolve()) and p.crop.size == 32 and p.resolutions == [4, 8, 16, 32]
    # what the 2-minute demo computes: SWD and MS-SSIM; no Inception (a 95 MB download, minutes of CPU)
    assert list(p.evaluate.metrics) == ["swd", "msssim"]
    assert demo.prepare(CELEBA_DIR, tmp_path / "demo") == path                  # the same again: kept (resume)


def _header(text: str) -> list[str]:
    lines = text.splitlines()
    return lines[:next(i for i, x in enumerate(lines) if not x.startswith("#"))]


def _prose(lines: list[str]) -> str:
    return " ".join(line[2:] for line in lines)


def test_minutes_stretches_every_phase_and_keeps_the_comments(tmp_path):
    base = params_mod.load(demo.prepare(CELEBA_DIR, tmp_path / "a"))
    path = demo.prepare(CELEBA_DIR, tmp_path / "b", minutes=20)
    long = params_mod.load(path)
    factor = (20 * 60 - demo.DEMO_FIXED_S) / (demo.DEMO_MINUTES * 60 - demo.DEMO_FIXED_S)
    for r, (tr, st) in _stages(base).items():
        assert _stages(long)[r] == (round(tr * factor, 1), round(st * factor, 1)), r
    # a long run: every face, and the official lr (the demo's own was measured over its 14 kimg only)
    assert long.data.max_images is None and base.data.max_images is not None
    assert {long.stage(r).lr for r in long.resolutions} == {demo.OFFICIAL_LR} != {base.stage(4).lr}
    short = params_mod.load(demo.prepare(CELEBA_DIR, tmp_path / "c", minutes=5))
    assert short.data.max_images == base.data.max_images and short.stage(32).lr == base.stage(32).lr
    text, template = path.read_text(), demo.template()
    total_kimg = sum(sum(v) for v in _stages(long).values())
    header = _header(text)
    assert _prose(header).startswith(f"STRETCHED by `progan demo --minutes 20`: every phase's kimg x{factor:.1f} "
                                     f"({total_kimg:g} kimg in all), every image of the folder, the official lr 0.001")
    for fact in ("every image of a folder", f"with {_stages(long)[32][1]:g} kimg per fade-in",
                 f"({total_kimg:g} kimg in all, minibatch 16, lr 0.001)"):  # the header states the run's own numbers
        assert fact in _prose(header), fact
    assert len(header) == len(_header(template)) + 2 and all(len(line) <= 120 for line in header[:2])
    assert text.count("#") - " ".join(header).count("#") == template.count("#") - " ".join(_header(template)).count("#")
    with pytest.raises(ProganError, match=r"--minutes 1: the demo takes about 2 minutes at the least"):
        demo.prepare(CELEBA_DIR, tmp_path / "d", minutes=1)
    with pytest.raises(ProganError, match=r"exists with other settings; remove it or pick another --workdir"):
        demo.prepare(CELEBA_DIR, tmp_path / "b", minutes=30)


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--minutes N" in out and "demo-<N>min" in out
