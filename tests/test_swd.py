"""SWD (metrics/swd.py, torch) against the numpy/scipy port of the official code (metrics/swd_reference.py),
hand-computed values, and sanity on real CelebA faces."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from helpers import CELEBA_DIR
from progan.metrics import swd as S
from progan.metrics import swd_reference as R

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waits on the shared 2-core machine (results are identical)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def celeba(n: int, size_px: int, first: int = 0) -> np.ndarray:
    """Real CelebA faces first..first+n-1 (sorted names): centre 178x178 crop resized to size_px, uint8."""
    out = []
    for f in sorted(CELEBA_DIR.glob("*.jpg"))[first:first + n]:
        with Image.open(f) as im:
            out.append(np.asarray(im.convert("RGB").crop((0, 20, 178, 198)).resize((size_px, size_px),
                                                                                   Image.BICUBIC)))
    return np.stack(out)


@pytest.fixture(scope="module")
def faces64():
    return celeba(192, 64)


def noisy(x: np.ndarray, amount: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(x.astype(int) + rng.integers(-amount, amount + 1, x.shape), 0, 255).astype(np.uint8)


# ---- pyramid -------------------------------------------------------------------------------------------

def test_down_matrix_by_hand():
    """4 px, kernel [1,4,6,4,1]/16, mirror (d c b | a b c d | c b a): output 0 reads c b a b c -> a 6, b 4+4,
    c 1+1; output 1 reads a b c d c -> a 1, b 4, c 6+1, d 4."""
    np.testing.assert_array_equal(S.down_matrix(4) * 16, [[6, 8, 2, 0], [1, 4, 7, 4]])
    # up: zeros inserted (a 0 b 0), blur x2 ([1,4,6,4,1]/8), mirror: output 0 reads b 0 a 0 b -> a 6, b 1+1;
    # output 2 reads a 0 b 0 b -> a 1, b 6+1; output 3 reads 0 b 0 b 0 -> b 4+4
    np.testing.assert_array_equal(S.up_matrix(2) * 8, [[6, 2], [4, 4], [1, 7], [0, 8]])


def test_pyramid_matches_scipy_reference():
    rng = np.random.default_rng(0)
    x = (rng.random((3, 3, 32, 32)) * 255).astype(np.float32)
    xt = torch.from_numpy(x)
    np.testing.assert_allclose(S.pyr_down(xt).numpy(), R.pyr_down(x), atol=1e-4)
    np.testing.assert_allclose(S.pyr_up(xt).numpy(), R.pyr_up(x), atol=1e-4)
    ref = R.laplacian_pyramid(x, 2)
    for level in range(2):
        np.testing.assert_allclose(S.pyramid_level(xt, level, 2).numpy(), ref[level], atol=1e-4)


def test_laplacian_pyramid_reconstructs_the_image():
    """Band-pass levels + up-sampled residual give the image back (official reconstruct_laplacian_pyramid)."""
    x = torch.from_numpy(celeba(2, 64).transpose(0, 3, 1, 2).astype(np.float32))
    levels = [S.pyramid_level(x, i, 3) for i in range(3)]
    assert [lv.shape[-1] for lv in levels] == [64, 32, 16]
    image = levels[2]
    for band in levels[1::-1]:
        image = S.pyr_up(image) + band
    assert float((image - x).abs().max()) < 1e-3


def test_level_sizes_and_neighbourhoods():
    assert R.level_sizes_px(128) == [128, 64, 32, 16]
    assert R.level_sizes_px(16) == [16]
    assert R.level_sizes_px(8) == [8] and R.level_sizes_px(4) == [4]     # the image itself, as the residual
    assert [R.nhood_px(s) for s in (128, 16, 8, 4)] == [7, 7, 7, 3]


# ---- descriptors ---------------------------------------------------------------------------------------

def test_descriptors_are_the_neighbourhoods():
    level = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    centres = torch.tensor([[[3, 3], [10, 12]], [[5, 7], [12, 3]]])               # (y, x)
    desc = S.get_descriptors(level, centres, 7)
    assert desc.shape == (4, 147)
    for i, (img, (y, x)) in enumerate([(0, (3, 3)), (0, (10, 12)), (1, (5, 7)), (1, (12, 3))]):
        expected = level[img, :, y - 3:y + 4, x - 3:x + 4].reshape(-1)
        assert torch.equal(desc[i], expected)
    np.testing.assert_array_equal(R.get_descriptors(level.numpy(), centres.numpy(), 7).reshape(4, -1), desc)


def test_centres_do_not_depend_on_batching_and_stay_inside():
    whole = R.draw_centres(5, 1, 2, 0, 150, 32, 128)
    parts = np.concatenate([R.draw_centres(5, 1, 2, a, b, 32, 128) for a, b in [(0, 37), (37, 64), (64, 150)]])
    np.testing.assert_array_equal(whole, parts)
    assert whole.min() == 3 and whole.max() == 32 - 4                  # official randint(3, S - 3)
    assert not np.array_equal(whole, R.draw_centres(5, 0, 2, 0, 150, 32, 128))  # sides differ
    d = R.draw_directions(5, 0, 147, 4, 128)
    assert d.shape == (4, 147, 128) and d.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-6)


# ---- distance ------------------------------------------------------------------------------------------

def test_sliced_wasserstein_by_hand():
    """One direction e1 (channel 0 only), 4 descriptors of 3 channels (1x1 neighbourhoods):
    a = t for t in 0,1,2,3 -> normalised (t - 1.5) / sqrt(1.25) = -1.342, -0.447, 0.447, 1.342
    b = 0,0,0,4            -> normalised (t - 1) / sqrt(3)      = -0.577, -0.577, -0.577, 1.732
    sorted |differences| 0.764, 0.130, 1.025, 0.390, mean 0.5773."""
    a = np.repeat(np.array([[0.0], [1.0], [2.0], [3.0]], np.float32), 3, axis=1)
    b = np.repeat(np.array([[0.0], [0.0], [0.0], [4.0]], np.float32), 3, axis=1)
    dirs = np.zeros((1, 3, 1), np.float32)
    dirs[0, 0, 0] = 1.0
    an = (np.array([0, 1, 2, 3]) - 1.5) / math.sqrt(1.25)
    bn = (np.array([0, 0, 0, 4]) - 1.0) / math.sqrt(3.0)
    expected = float(np.mean(np.abs(an - bn)))
    assert expected == pytest.approx(0.5773, abs=1e-4)
    assert S.sliced_wasserstein(a, b, dirs, CPU) == pytest.approx(expected, rel=1e-6)
    ref = R.sliced_wasserstein(R.finalize_descriptors(a.reshape(4, 3, 1, 1)),
                               R.finalize_descriptors(b.reshape(4, 3, 1, 1)), dirs)
    assert ref == pytest.approx(expected, rel=1e-6)
    assert S.sliced_wasserstein(a, a, dirs, CPU) == 0.0


def test_distance_matches_reference_on_same_descriptors_and_directions(faces64, monkeypatch):
    """Same descriptors and directions in both: equal to float tolerance, also when the directions are
    processed in many small chunks (the memory bound)."""
    levels = [S.pyramid_level(torch.from_numpy(f.transpose(0, 3, 1, 2).astype(np.float32)), 0, 3)
              for f in (faces64[:48], noisy(faces64[48:96], 20))]
    desc = [S.get_descriptors(lv, torch.from_numpy(R.draw_centres(1, i, 0, 0, 48, 64, 128)), 7)
            for i, lv in enumerate(levels)]
    dirs = R.draw_directions(1, 0, 147, 4, 128)
    ref = R.sliced_wasserstein(R.finalize_descriptors(desc[0].numpy().reshape(-1, 3, 7, 7)),
                               R.finalize_descriptors(desc[1].numpy().reshape(-1, 3, 7, 7)), dirs)
    ours = S.sliced_wasserstein(desc[0], desc[1], dirs, CPU)
    assert ours == pytest.approx(ref, rel=2e-5)
    monkeypatch.setitem(S._PROJ_BYTES, "cpu", 4 * len(desc[0]) * 5)      # 5 directions per chunk
    monkeypatch.setattr(S, "_ROW_CHUNK", 1000)
    assert S.sliced_wasserstein(desc[0], desc[1], dirs, CPU) == pytest.approx(ours, rel=1e-6)


@pytest.mark.parametrize("size_px", [32, 8, 4])
def test_swd_matches_reference_end_to_end(faces64, size_px):
    small = np.stack([np.asarray(Image.fromarray(f).resize((size_px, size_px), Image.BOX)) for f in faces64[:80]])
    a, b = small[:40], noisy(small[40:80], 25)
    ref = R.swd(a, b, descriptors_per_image=64, directions=32, repeats=2, seed=7, batch=16)
    ours = S.swd(a, b, descriptors_per_image=64, directions=32, repeats=2, seed=7, batch=11, device=CPU)
    assert list(ours) == list(ref) == [*(f"swd_{s}" for s in R.level_sizes_px(size_px)), "swd_avg"]
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], rel=1e-4), key


def test_spilled_descriptors_equal_in_memory_ones(faces64, tmp_path):
    opts = dict(seed=3, per_image=16, batch=20, device=CPU)
    ram = S.level_descriptors(faces64[:50], 0, 1, **opts)
    disk = S.level_descriptors(faces64[:50], 0, 1, spill_dir=tmp_path, ram_bytes=0, **opts)
    assert isinstance(disk[0], torch.Tensor) and disk[0].shape == (800, 147)
    for x, y in zip(ram, disk):
        assert torch.equal(x, y)
    del disk
    assert list(tmp_path.iterdir()) == []                       # the temp file was never linked


def test_swd_with_spilled_buffers_equals_swd_in_ram(faces64, tmp_path):
    """swd() reuses one descriptor buffer per set across levels (Buffers); spilled to an unlinked file
    under spill_dir, the values are the same to the bit and nothing is left there."""
    a, b = faces64[:24], noisy(faces64[24:48], 15)
    opts = dict(descriptors_per_image=16, directions=8, repeats=2, seed=2, batch=10, device=CPU)
    ram = S.swd(a, b, **opts)
    assert list(ram) == ["swd_64", "swd_32", "swd_16", "swd_avg"]
    assert S.swd(a, b, spill_dir=tmp_path, ram_bytes=0, **opts) == ram
    assert list(tmp_path.iterdir()) == []


def test_constant_images_give_finite_values():
    grey = np.full((8, 16, 16, 3), 90, np.uint8)
    result = S.swd(grey, noisy(grey, 10), descriptors_per_image=8, directions=8, repeats=1, device=CPU)
    assert all(math.isfinite(v) for v in result.values())


def test_sanity_on_real_faces(faces64):
    """real vs real << real vs blurred << real vs noise (64 px, 96 vs 96 CelebA faces). Blur acts on the
    finest band (swd_64: measured here 26 real vs 114 blurred); the low-pass 16 px level barely changes."""
    a, b = faces64[:96], faces64[96:192]
    blurred = np.stack([np.asarray(Image.fromarray(f).filter(ImageFilter.GaussianBlur(1.5))) for f in b])
    noise = np.random.default_rng(0).integers(0, 256, b.shape, dtype=np.uint8)
    opts = dict(descriptors_per_image=64, directions=64, repeats=2, seed=0, device=CPU)
    rr, rb, rn = (S.swd(a, x, **opts) for x in (b, blurred, noise))
    assert 3 * rr["swd_64"] < rb["swd_64"] < rn["swd_64"], (rr, rb, rn)
    assert 2 * rr["swd_avg"] < rb["swd_avg"] and 2 * rb["swd_avg"] < rn["swd_avg"], (rr, rb, rn)
