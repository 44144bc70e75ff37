"""MS-SSIM (metrics/msssim.py) against a direct numpy port of the official `metrics/ms_ssim.py` and known values."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import signal

from helpers import CELEBA_DIR
from progan.metrics import msssim as M


# ---- direct numpy port of the official metrics/ms_ssim.py (fftconvolve, NHWC, float32) ---------------------

def _fspecial_gauss(size, sigma):
    radius = size // 2
    offset, start, stop = 0.0, -radius, radius + 1
    if size % 2 == 0:
        offset, stop = 0.5, stop - 1
    x, y = np.mgrid[offset + start:stop, offset + start:stop]
    g = np.exp(-((x**2 + y**2) / (2.0 * sigma**2)))
    return g / g.sum()


def _ssim_for_multiscale(img1, img2, max_val=255, filter_size=11, filter_sigma=1.5, k1=0.01, k2=0.03):
    img1, img2 = img1.astype(np.float32), img2.astype(np.float32)
    _, height, width, _ = img1.shape
    size = min(filter_size, height, width)
    sigma = size * filter_sigma / filter_size
    window = np.reshape(_fspecial_gauss(size, sigma), (1, size, size, 1))
    mu1 = signal.fftconvolve(img1, window, mode="valid")
    mu2 = signal.fftconvolve(img2, window, mode="valid")
    sigma11 = signal.fftconvolve(img1 * img1, window, mode="valid")
    sigma22 = signal.fftconvolve(img2 * img2, window, mode="valid")
    sigma12 = signal.fftconvolve(img1 * img2, window, mode="valid")
    mu11, mu22, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma11, sigma22, sigma12 = sigma11 - mu11, sigma22 - mu22, sigma12 - mu12
    c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
    v1 = 2.0 * sigma12 + c2
    v2 = sigma11 + sigma22 + c2
    ssim = np.mean((((2.0 * mu12 + c1) * v1) / ((mu11 + mu22 + c1) * v2)), axis=(1, 2, 3))
    cs = np.mean(v1 / v2, axis=(1, 2, 3))
    return ssim, cs


def _hox_downsample(img):
    return (img[:, 0::2, 0::2, :] + img[:, 1::2, 0::2, :] + img[:, 0::2, 1::2, :] + img[:, 1::2, 1::2, :]) * 0.25


def official_msssim(img1, img2, weights=None):
    weights = np.array(weights if weights else [0.0448, 0.2856, 0.3001, 0.2363, 0.1333])
    im1, im2 = img1.astype(np.float32), img2.astype(np.float32)
    mssim, mcs = [], []
    for _ in range(weights.size):
        ssim, cs = _ssim_for_multiscale(im1, im2)
        mssim.append(ssim)
        mcs.append(cs)
        im1, im2 = _hox_downsample(im1), _hox_downsample(im2)
    mssim = np.clip(np.asarray(mssim), 0.0, np.inf)
    mcs = np.clip(np.asarray(mcs), 0.0, np.inf)
    return np.mean(np.prod(mcs[:-1, :] ** weights[:-1, np.newaxis], axis=0) * (mssim[-1, :] ** weights[-1]))


# ---- data ----------------------------------------------------------------------------------------------

def celeba(n: int, size_px: int) -> np.ndarray:
    """n real CelebA faces: centre 178x178 crop, resized to size_px, uint8 [n, S, S, 3]."""
    files = sorted(CELEBA_DIR.glob("*.jpg"))[:n]
    out = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB").crop((0, 20, 178, 198)).resize((size_px, size_px), Image.BICUBIC)
            out.append(np.asarray(im))
    return np.stack(out)


@pytest.fixture(scope="module")
def faces64():
    return celeba(16, 64)


# ---- tests ---------------------------------------------------------------------------------------------

def test_identical_images_score_one(faces64):
    assert M.msssim(faces64, faces64, device="cpu") == pytest.approx(1.0, abs=1e-6)


def test_matches_official_numpy_port_on_real_faces(faces64):
    a, b = faces64[0::2], faces64[1::2]
    ours = M.msssim_per_pair(a, b, device="cpu").numpy()
    ref = [official_msssim(a[i:i + 1], b[i:i + 1]) for i in range(len(a))]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5)
    # some pairs of different faces are 0: a negative cs at a coarse scale is clipped (as official)
    assert 0.0 <= ours.min() < ours.max() < 1.0 and np.count_nonzero(ours) >= 3


@pytest.mark.parametrize("size_px", [16, 32])
def test_matches_official_numpy_port_on_noise_small_images(size_px):
    rng = np.random.default_rng(size_px)
    a = rng.integers(0, 256, (6, size_px, size_px, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(M.msssim(a, b, device="cpu"), official_msssim(a, b), rtol=0, atol=2e-5)


def test_hand_checked_constant_images():
    """Two flat images, grey levels a and b: every sigma is 0, so cs = 1 at every scale and the score is
    the luminance term (2ab + c1) / (a^2 + b^2 + c1) ^ 0.1333, c1 = (0.01 * 255)^2 = 6.5025."""
    a, b = 100.0, 120.0
    x = np.full((1, 32, 32, 3), a, np.uint8)
    y = np.full((1, 32, 32, 3), b, np.uint8)
    c1 = (0.01 * 255) ** 2
    expected = ((2 * a * b + c1) / (a * a + b * b + c1)) ** 0.1333
    # by hand: 24006.5 / 24406.5 = 0.983611, ln = -0.016525, x 0.1333 = -0.0022028, exp = 0.997800
    assert expected == pytest.approx(0.997800, abs=1e-6)
    assert M.msssim(x, y, device="cpu") == pytest.approx(expected, abs=1e-6)


def test_gaussian_window_matches_fspecial():
    for size, sigma in [(11, 1.5), (8, 8 * 1.5 / 11), (1, 1.5 / 11)]:
        g = M.gaussian_1d(size, sigma)
        np.testing.assert_allclose(np.outer(g, g), _fspecial_gauss(size, sigma), atol=1e-12)


def test_small_stages_use_fewer_scales():
    """8 px and 4 px: the official code gives NaN; we use log2(R)+1 scales with the first weights."""
    rng = np.random.default_rng(0)
    for size_px, scales in [(8, 4), (4, 3)]:
        assert M.num_scales(size_px) == scales
        a = rng.integers(0, 256, (4, size_px, size_px, 3), dtype=np.uint8)
        b = rng.integers(0, 256, (4, size_px, size_px, 3), dtype=np.uint8)
        ours = M.msssim(a, b, device="cpu")
        assert ours == pytest.approx(official_msssim(a, b, weights=list(M.WEIGHTS[:scales])), abs=2e-5)
        assert M.msssim(a, a, device="cpu") == pytest.approx(1.0, abs=1e-6)


def test_more_similar_pairs_score_higher(faces64):
    a = faces64[:8]
    noisy = np.clip(a.astype(int) + np.random.default_rng(1).integers(-60, 61, a.shape), 0, 255).astype(np.uint8)
    same = M.msssim(a, a, device="cpu")
    slightly = M.msssim(a, noisy, device="cpu")
    others = M.msssim(a, faces64[8:16], device="cpu")
    assert same > slightly > others


def test_shape_mismatch_is_an_error(faces64):
    with pytest.raises(ValueError, match="same shape"):
        M.msssim(faces64[:2], faces64[:2, :32, :32], device="cpu")
