"""The tiny DAG from each new source (issue #29) in both front ends: real `snakemake` and real `dvc repro` in a project
folder. Each front end runs the whole DAG (download -> crop -> pyramid -> train -> evaluate -> report; 8 px only,
train.start_px 8, to keep it short: test_workflow.py runs the growing DAG) from the
CIFAR-10 binary archive (served by a real HTTP server on 127.0.0.1), then the data stages again from an LSUN-style
LMDB (WebP and JPEG values) and from a folder of odd images: what follows the pyramid does not depend on where the
images came from. Tiny nets, 8 px, a handful of images, a few seconds of training."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import yaml
from PIL import Image

from progan import params as params_mod, paths, pipeline

from helpers import CELEBA_DIR, make_workspace, tiny_params
from test_download import serving
from test_sources import lsun_values, make_cifar_archive, make_lmdb, md5
from test_workflow import _check, _dvc, _snakemake

pytestmark = pytest.mark.slow
STAGES = {"8": {"batch": 4, "lr": 0.001, "transition_kimg": 0, "stabilize_kimg": 0.008}}   # train.start_px 8: 6 jobs


def _sources(tmp_path):
    """(cifar archive bytes and md5, LMDB folder, odd-images folder)."""
    archive = tmp_path / "cifar-10-binary.tar.gz"
    make_cifar_archive(archive, records=2)                                         # 10 training images
    make_lmdb(tmp_path / "lsun" / "bedroom_train_lmdb", lsun_values())             # 6 that decode
    odd = tmp_path / "odd"
    odd.mkdir()
    face = Image.open(sorted(CELEBA_DIR.glob("*.jpg"))[0]).convert("RGB")
    face.convert("RGBA").save(odd / "rgba.png")
    face.convert("L").save(odd / "grey.png")
    face.convert("CMYK").save(odd / "cmyk.jpg")
    Image.fromarray(np.asarray(face.convert("L")).astype(np.uint16) * 257).save(odd / "grey16.png")
    face.quantize(32).save(odd / "palette.gif")
    (odd / "truncated.jpg").write_bytes((odd / "cmyk.jpg").read_bytes()[:200])
    return archive, tmp_path / "lsun" / "bedroom_train_lmdb", odd


def _set(ws, **data):
    path = ws / "params.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["data"].update(data)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def _kept(ws) -> list[dict]:
    with open(ws / paths.FACES_MANIFEST, newline="") as f:
        return list(csv.DictReader(f))


def _workspace(tmp_path, url, checksum):
    ws = make_workspace(tmp_path / "ws")
    tiny_params(ws, size_px=8, data__source="cifar10", data__url=url, data__md5=checksum, data__folder=None,
                data__max_images=None, crop__detector="center", crop__min_kept_fraction=0.5, train__stages=STAGES,
                train__start_px=8,
                train__tick_kimg=0.008, evaluate__metrics=["swd"], evaluate__num_images=8, evaluate__msssim_pairs=0,
                report__grid_images=4, mlflow__tracking_uri="sqlite:////proc/progan-no-mlflow/mlflow.db")
    (ws / "dvc.yaml").write_text(pipeline.dvc_yaml(params_mod.load(ws / "params.yaml")))
    return ws


def _check_data(ws, kept: int, skipped: int = 0) -> None:
    rows = _kept(ws)
    assert sum(r["status"] == "kept" for r in rows) == kept and sum(r["status"] == "skipped" for r in rows) == skipped
    assert np.load(ws / paths.pyramid_level(8), mmap_mode="r").shape == (kept, 8, 8, 3)


def _run_all_sources(tmp_path, run_all, run_data):
    archive, lmdb_dir, odd = _sources(tmp_path)
    with serving() as srv:
        srv.files["/cifar-10-binary.tar.gz"] = archive.read_bytes()
        ws = _workspace(tmp_path, f"{srv.url}/cifar-10-binary.tar.gz", md5(archive))
        run_all(ws)
    _check_data(ws, 10)
    params = params_mod.load(ws / "params.yaml")
    assert all((ws / p).exists() for j in pipeline.jobs(params) for p in j.out_paths)
    assert (ws / paths.REPORT_HTML).exists()
    _set(ws, source="lsun", url=None, md5=None, folder=str(lmdb_dir))
    run_data(ws)
    _check_data(ws, 6)
    assert (ws / "data/raw/lsun-bedroom_train_lmdb/images/keys.tsv").exists()
    _set(ws, source="folder", folder=str(odd))
    run_data(ws)
    _check_data(ws, 5, skipped=1)
    notes = {r["file"].rsplit("/", 1)[1]: r["reason"] for r in _kept(ws)}
    assert notes["rgba.png"].startswith("RGBA with transparency: alpha composited on white") and \
        notes["truncated.jpg"] == "truncated"


@pytest.mark.xdist_group("sources_snakemake")
def test_each_new_source_through_snakemake(tmp_path):
    _run_all_sources(tmp_path, lambda ws: _check(_snakemake(ws)),
                     lambda ws: _check(_snakemake(ws, paths.PYRAMID_INFO)))


@pytest.mark.xdist_group("sources_dvc")
def test_each_new_source_through_dvc(tmp_path):
    def run_all(ws):
        _check(_dvc(ws, "init", "--no-scm", "-q"))
        _check(_dvc(ws, "repro"))
    _run_all_sources(tmp_path, run_all, lambda ws: _check(_dvc(ws, "repro", "pyramid")))
