"""The reals' Inception statistics and scoring (progan.metrics.real_stats) with the real library code and a
stand-in feature network made in the test (helpers.standin_inception: the published weights cannot be
downloaded here): real CelebA faces vs themselves give FID ~0 and KID ~0, vs blurred faces more, vs noise much
more; the statistics file round-trips, is checked against settings and source, and is reused as is."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from helpers import celeba_faces, standin_inception
from test_train import one_thread
from progan.errors import ProganError
from progan.metrics import inception
from progan.metrics import real_stats as S

RES = 32
N = 240


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    return celeba_faces(N, RES)


@pytest.fixture(scope="module")
def net():
    return standin_inception()


def settings(**kw) -> S.InceptionSettings:
    base = dict(num_images=N, max_reals=50000, min_res_px=32, batch=64, kid_subsets=20, kid_subset_size=100,
                is_splits=10, seed=123)
    return S.InceptionSettings(**{**base, **kw})


def batches(images: np.ndarray, size: int = 50):
    for start in range(0, len(images), size):
        yield images[start:start + size]


def test_reals_vs_themselves_blurred_and_noise(tmp_path, faces, net):
    path = S.compute_real_stats(faces, settings(), tmp_path / "32.npz", net=net, device="cpu")
    blurred = np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(1.0))) for x in faces])
    noise = np.random.default_rng(0).integers(0, 256, faces.shape, dtype=np.uint8)
    got = {name: S.score(batches(images), path, settings(), metrics=("fid", "kid"), net=net, device="cpu")
           for name, images in (("same", faces), ("blurred", blurred), ("noise", noise))}
    fid = {k: v["fid240"] for k, v in got.items()}
    kid = {k: v["kid240"] for k, v in got.items()}
    assert set(got["same"]) == {"fid240", "kid240", "kid240_std"}
    assert abs(fid["same"]) < 1e-3 * fid["noise"] and abs(kid["same"]) < 0.01 * kid["noise"], got
    assert 10 * abs(fid["same"]) < fid["blurred"] < fid["noise"] / 3, fid
    assert 10 * abs(kid["same"]) < kid["blurred"] < kid["noise"] / 3, kid


def test_stats_file_round_trip_and_is_what_was_computed(tmp_path, faces, net):
    stats = S.real_stats_from_level(faces, settings(), net, "cpu", RES)
    path = S.compute_real_stats(faces, settings(), tmp_path / "32.npz", net=net, device="cpu")
    loaded = S.load_real_stats(path, settings(), RES, len(faces))
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.testing.assert_array_equal(loaded.features, stats.features)
    assert loaded.features.dtype == np.float32 and loaded.features.shape == (N, inception.FEATURE_DIM)
    meta = loaded.meta
    assert meta["available"] and meta["num_reals"] == N and meta["res_px"] == RES and meta["subset_seed"] is None
    assert meta["weights_sha256"] == inception.WEIGHTS.sha256 and meta["feature_extractor"].startswith("torch-fidelity 0.4.0")
    assert meta["source_sha256"] == S._array_sha256(faces)
    assert not [f for f in tmp_path.iterdir() if ".tmp-" in f.name]                  # atomic, nothing left
    with np.load(path, allow_pickle=False) as z:                                      # plain arrays only
        assert sorted(z.files) == ["features", "meta", "mu", "sigma"]


def test_a_level_path_is_hashed_and_a_bigger_level_gives_a_fixed_subset(tmp_path, faces, net):
    level = tmp_path / "32.npy"
    np.save(level, faces)
    small = settings(max_reals=100, num_images=100)
    path = S.compute_real_stats(level, small, tmp_path / "stats.npz", net=net, device="cpu")
    meta = S.read_meta(path)
    from progan.fileio import sha256_file
    assert meta["source_sha256"] == sha256_file(level) and meta["source"] == str(level)
    assert meta["num_reals"] == 100 and meta["subset_seed"] == S.REAL_SUBSET_SEED
    index = S.real_index(N, 100)
    assert len(index) == 100 and len(set(index)) == 100 and (np.diff(index) > 0).all()
    np.testing.assert_array_equal(index, S.real_index(N, 100))                         # the same every time
    expected = S.real_stats_from_level(faces[index], small, net, "cpu", RES)
    np.testing.assert_allclose(S.load_real_stats(path, small, RES, N).mu, expected.mu, rtol=1e-12)


@pytest.mark.parametrize("change, field", [
    (dict(max_reals=100), "num_reals"),
    ("weights", "weights_sha256"),
    ("res", "res_px"),
])
def test_stats_made_with_other_settings_are_stale_with_one_line(tmp_path, faces, net, monkeypatch, change, field):
    path = S.compute_real_stats(faces, settings(), tmp_path / "32.npz", net=net, device="cpu")
    res, s = RES, settings()
    if change == "weights":
        monkeypatch.setattr(inception, "WEIGHTS", dataclasses.replace(inception.WEIGHTS, sha256="0" * 64))
    elif change == "res":
        res = 64
    else:
        s = settings(**change)
    with pytest.raises(S.StaleStats) as err:
        S.load_real_stats(path, s, res, len(faces))
    assert str(err.value).startswith(f"{path}: made with {field} ") and "\n" not in str(err.value)


def test_stats_of_another_level_version_are_stale(tmp_path, faces, net):
    path = S.compute_real_stats(faces, settings(), tmp_path / "32.npz", net=net, device="cpu")
    with pytest.raises(S.StaleStats, match="made from another version of its pyramid level"):
        S.load_real_stats(path, settings(), RES, len(faces), source_sha256="f" * 64)
    assert S.load_real_stats(path, settings(), RES, len(faces), source_sha256=S._array_sha256(faces)) is not None


def test_without_weights_a_placeholder_is_written_and_scores_nothing(tmp_path, faces, monkeypatch, caplog):
    def offline(*a, **k):
        raise inception.WeightsUnavailable("Inception weights for fid/kid/is: X is missing and cannot be fetched")
    monkeypatch.setattr(inception, "load_network", offline)
    path = S.compute_real_stats(faces, settings(max_reals=100), tmp_path / "32.npz", device="cpu")
    meta = S.read_meta(path)
    assert meta["available"] is False and meta["reason"].startswith("Inception weights for fid/kid/is: X is missing")
    assert S.load_real_stats(path, settings(max_reals=100), RES, len(faces)) is None
    assert "X is missing" in caplog.text
    assert (f"wrote {path} as a placeholder (no statistics: evaluate leaves fid/kid/is out); once the weights are "
            f"there, `dvc repro --force --downstream fid-stats` or `snakemake --cores all --forcerun fid_stats` "
            f"re-makes the statistics and re-runs the evaluations that use them") in caplog.text      # by hand: both
    with pytest.raises(inception.WeightsUnavailable, match="holds no statistics"):
        S.score(batches(faces), path, settings(max_reals=100), device="cpu")


def test_below_min_res_and_too_few_generated_images_are_one_line_errors(tmp_path, faces, net):
    with pytest.raises(ProganError, match="16 px is below evaluate.fid.min_res_px 32"):
        S.compute_real_stats(celeba_faces(4, 16), settings(), tmp_path / "16.npz", net=net, device="cpu")
    stats = S.real_stats_from_level(faces, settings(), net, "cpu", RES)
    with pytest.raises(ProganError, match="got 100 generated images, evaluate.fid.num_images is 240"):
        S.score(batches(faces[:100]), stats, settings(), net=net, device="cpu")


def test_inception_score_through_score(faces, net):
    stats = S.real_stats_from_level(faces, settings(), net, "cpu", RES)
    out = S.score(batches(faces), stats, settings(), metrics=("is",), net=net, device="cpu")
    assert set(out) == {"is240", "is240_std"} and out["is240"] >= 1.0 and json.dumps(out)


def test_run_is_the_stage_entry(tmp_path, faces, net, monkeypatch):
    from helpers import tiny_params
    from progan import params as params_mod
    from progan import paths

    p = params_mod.load(tiny_params(tmp_path, size_px=RES, evaluate__fid__max_reals=100))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(inception, "load_network", lambda device, *a, **k: (net, "stand-in"))
    with pytest.raises(ProganError, match=r"^--res 16: no Inception statistics .* >= evaluate.fid.min_res_px 32 are 32$"):
        S.run(p, 16)
    with pytest.raises(ProganError, match=r"^data/pyramid/32.npy: no real images at 32 px; run `progan pyramid`"):
        S.run(p, RES)
    (tmp_path / paths.PYRAMID_DIR).mkdir(parents=True)
    np.save(tmp_path / paths.pyramid_level(RES), faces)
    assert str(S.run(p, RES)) == paths.fid_stats(RES) and (tmp_path / paths.fid_stats(RES)).is_file()
    meta = S.read_meta(paths.fid_stats(RES))
    assert meta["num_reals"] == 100 and meta["num_level_images"] == N and meta["source"] == paths.pyramid_level(RES)


def test_the_statistics_do_not_depend_on_the_batch(faces, net):
    """evaluate.fid.batch is no param of fid-stats (images per forward: how fast, not what; test_params_read.py)."""
    a = S.real_stats_from_level(faces, settings(batch=64), net, "cpu", RES)
    b = S.real_stats_from_level(faces, settings(batch=17), net, "cpu", RES)
    np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-6 * np.abs(a.features).max())
    np.testing.assert_allclose(a.mu, b.mu, rtol=1e-5)
    np.testing.assert_allclose(a.sigma, b.sigma, rtol=1e-4, atol=1e-6 * np.abs(a.sigma).max())


def test_the_fid_stats_settings_read_only_what_the_statistics_need(tmp_path):
    from helpers import tiny_params
    from progan import params as params_mod

    p = params_mod.load(tiny_params(tmp_path, size_px=RES)).recording()
    s = S.InceptionSettings.from_params(p, scoring=False)
    assert p.reads == {"evaluate.fid.max_reals", "evaluate.fid.min_res_px", "evaluate.fid.batch",
                       "evaluate.inception_weights", "evaluate.fid.cache_dir"}
    assert s.num_images is None and s.seed is None and s.key(RES, 10) == S.InceptionSettings.from_params(p).key(RES, 10)
