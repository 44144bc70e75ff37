"""FID, KID and IS formulas (progan.metrics.fid, through torch-fidelity) against closed forms on Gaussians and the
reference constructions rebuilt here: the official ProGAN calculate_frechet_distance (scipy sqrtm), Binkowski's
polynomial MMD averages, the official get_inception_score. And the streaming mean/covariance against numpy."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from test_train import one_thread

from progan.metrics import fid as F


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _official_frechet_distance(mu1, sigma1, mu2, sigma2):
    """tkarras/progressive_growing_of_gans metrics/frechet_inception_distance.py calculate_frechet_distance."""
    m = np.square(mu1 - mu2).sum()
    s = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))         # official: disp=False (deprecated), same matrix
    return float(np.real(m + np.trace(sigma1 + sigma2 - 2 * s)))


def _gaussian(rng, d):
    a = rng.standard_normal((d, d))
    return rng.standard_normal(d) * 3, a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_closed_form_and_official_construction():
    # commuting (diagonal) covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 9.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()                   # 5 + 1 + 1 + 0 + 0.25
    assert F.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # general covariances: the official scipy.linalg.sqrtm construction
    rng = np.random.default_rng(0)
    (m1, s1), (m2, s2) = _gaussian(rng, 64), _gaussian(rng, 64)
    got = F.frechet_distance(m1, s1, m2, s2)
    assert got == pytest.approx(_official_frechet_distance(m1, s1, m2, s2), rel=1e-9)
    assert F.frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_gaussian_samples_approaches_the_population_value():
    rng = np.random.default_rng(1)
    (m1, s1), (m2, s2) = _gaussian(rng, 8), _gaussian(rng, 8)
    population = _official_frechet_distance(m1, s1, m2, s2)
    sets = []
    for m, s in ((m1, s1), (m2, s2)):
        x = rng.multivariate_normal(m, s, size=40000)
        fs = F.FeatureSet(len(x), keep_features=False, dim=8)
        for start in range(0, len(x), 1000):
            fs.add(torch.from_numpy(x[start:start + 1000]))
        sets.append(fs)
    got = F.frechet_distance(sets[0].mean(), sets[0].cov(), sets[1].mean(), sets[1].cov())
    assert got == pytest.approx(population, rel=0.03)


def test_streaming_mean_and_covariance_equal_numpy_in_any_batching():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((300, 2048)) * rng.uniform(0.1, 3, 2048) + 1e3).astype(np.float32)  # a large offset
    fs = F.FeatureSet(250, keep_features=True)
    for start, stop in ((0, 1), (1, 64), (64, 200), (200, 300)):               # capacity 250: the rest is dropped
        fs.add(torch.from_numpy(x[start:stop]))
    assert fs.n == 250
    ref = x[:250].astype(np.float64)
    np.testing.assert_allclose(fs.mean(), ref.mean(0), rtol=1e-13)
    np.testing.assert_allclose(fs.cov(), np.cov(ref, rowvar=False), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(fs.kept_features(), x[:250])


def _reference_kid(f1, f2, subsets, subset_size, seed):
    """MMD-GAN compute_scores.py polynomial_mmd_averages (degree 3, gamma 1/d, coef0 1, unbiased), with the
    subsets drawn as torch-fidelity does (one RandomState, set 1 then set 2 per subset)."""
    rng = np.random.RandomState(seed)
    d = f1.shape[1]
    mmds = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), subset_size, replace=False)].astype(np.float64)
        y = f2[rng.choice(len(f2), subset_size, replace=False)].astype(np.float64)
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        m = subset_size
        mmds.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(mmds)), float(np.std(mmds))


def test_kid_is_the_reference_unbiased_polynomial_mmd():
    rng = np.random.default_rng(3)
    f1 = rng.standard_normal((400, 16)).astype(np.float32)
    f2 = (rng.standard_normal((300, 16)) * 1.3 + 0.2).astype(np.float32)
    mean, std = F.kid(f1, f2, subsets=20, subset_size=100, seed=7)
    ref_mean, ref_std = _reference_kid(f1, f2, 20, 100, 7)
    assert mean == pytest.approx(ref_mean, rel=1e-5) and std == pytest.approx(ref_std, rel=1e-4)
    # the subset size is capped by the smaller set
    assert F.kid_subset_size(1000, 400, 300) == 300
    assert F.kid(f1, f2, subsets=3, subset_size=1000, seed=7)[0] == pytest.approx(_reference_kid(f1, f2, 3, 300, 7)[0],
                                                                                  rel=1e-5)


def test_kid_of_zero_mean_gaussians_matches_the_closed_form():
    """For zero-mean X ~ N(0, S1), Y ~ N(0, S2) in d dimensions and k(x, y) = (x.y/d + 1)^3:
    E k = 1 + 3 E[(x.y)^2] / d^2 (odd moments vanish), E[(x.y)^2] = tr(Sa Sb), so
    MMD^2 = 3 ||S1 - S2||_F^2 / d^2; the unbiased estimate averages to it."""
    rng = np.random.default_rng(4)
    d = 4
    s1, s2 = np.diag([1.0, 1.0, 1.0, 1.0]), np.diag([2.0, 0.5, 1.0, 1.5])
    expected = 3 * np.sum((s1 - s2) ** 2) / d ** 2                                # 0.28125
    f1 = rng.multivariate_normal(np.zeros(d), s1, size=20000).astype(np.float32)
    f2 = rng.multivariate_normal(np.zeros(d), s2, size=20000).astype(np.float32)
    mean, std = F.kid(f1, f2, subsets=30, subset_size=1000, seed=0)              # std over subsets ~0.04
    assert mean == pytest.approx(expected, rel=0.1), (mean, std)
    same, _ = F.kid(f1, f1[::-1].copy(), subsets=30, subset_size=1000, seed=0)
    assert abs(same) < 0.05 * expected


def _official_inception_score(logits, splits):
    """tkarras/progressive_growing_of_gans metrics/inception_score.py get_inception_score (softmax of logits)."""
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds /= preds.sum(1, keepdims=True)
    scores = []
    for i in range(splits):
        part = preds[(i * preds.shape[0] // splits):((i + 1) * preds.shape[0] // splits), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return np.mean(scores), np.std(scores)


def test_inception_score_is_the_official_one_and_has_its_limits():
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((1000, 1008)) * 3).astype(np.float32)
    mean, std = F.inception_score(logits, splits=10)
    ref_mean, ref_std = _official_inception_score(logits.astype(np.float64), 10)
    assert mean == pytest.approx(ref_mean, rel=1e-9) and std == pytest.approx(ref_std, rel=1e-6)
    # every image sure of its class, 8 classes evenly in every split: IS = 8; all alike: IS = 1
    sure = np.full((800, 1008), -50.0, np.float32)
    sure[np.arange(800), np.arange(800) % 8] = 50.0
    assert F.inception_score(sure, splits=10)[0] == pytest.approx(8.0, rel=1e-6)
    assert F.inception_score(np.zeros((100, 1008), np.float32), splits=10)[0] == pytest.approx(1.0, abs=1e-12)


def test_metric_keys_name_the_count():
    assert [F.metric_key("fid", n) for n in (50000, 10000, 2000, 2500, 400)] == \
        ["fid50k", "fid10k", "fid2k", "fid2500", "fid400"]
    assert F.metric_key("kid", 50000) == "kid50k"
