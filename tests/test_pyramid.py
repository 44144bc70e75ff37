"""The pyramid stage: official rounding, memmap levels, chunked streaming, clear errors."""
import json

import numpy as np
import pytest
from PIL import Image

from progan import params as params_mod, paths
from progan.data import pyramid
from progan.errors import ProganError

from helpers import write_params


def test_downsample_matches_hand_computed_values():
    top = np.zeros((1, 4, 4, 3), np.uint8)
    top[0, :2, :2, 0] = [[1, 2], [2, 2]]      # mean 1.75 -> rint 2
    top[0, :2, 2:, 0] = [[1, 1], [1, 2]]      # mean 1.25 -> 1
    top[0, 2:, :2, 0] = [[0, 1], [0, 0]]      # 0.25 -> 0
    top[0, 2:, 2:, 0] = [[255, 255], [255, 254]]  # 254.75 -> 255
    levels = pyramid.downsample_levels(top, 3)
    assert levels[1][0, :, :, 0].tolist() == [[2, 1], [0, 255]]
    # the 1x1 level averages the *unrounded* 2x2 values: (1.75+1.25+0.25+254.75)/4 = 64.5 -> rint 64 (half to even)
    assert levels[2][0, 0, 0, 0] == 64
    # A case where rounding each level first would differ: 2x2 means 2.5, 2.5, 2.5, 3.5 are stored as
    # rint -> 2, 2, 2, 4 (mean 2.5 -> 2), but the 1x1 level from unrounded values is 2.75 -> 3.
    block_a = np.array([[2, 3], [2, 3]], np.uint8)
    block_b = np.array([[3, 4], [3, 4]], np.uint8)
    top2 = np.block([[block_a, block_a], [block_a, block_b]]).reshape(1, 4, 4, 1).repeat(3, -1)
    levels2 = pyramid.downsample_levels(top2, 3)
    assert levels2[1][0, :, :, 0].tolist() == [[2, 2], [2, 4]]
    assert levels2[2][0, 0, 0, 0] == 3


def _faces(folder, n, size, seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    (folder / paths.FACES_IMAGES_DIR).mkdir(parents=True)
    for i, img in enumerate(imgs):
        Image.fromarray(img).save(folder / paths.FACES_IMAGES_DIR / f"{i:06d}.png")
    return imgs


def test_run_writes_every_level_in_chunks(tmp_path, monkeypatch):
    params = params_mod.load(write_params(tmp_path, crop__size=16, pyramid__chunk_images=3,
                                          train__stages={str(r): {"batch": 4, "lr": 0.001, "transition_kimg": 0,
                                                                  "stabilize_kimg": 1} for r in (4, 8, 16)}))
    monkeypatch.chdir(tmp_path)
    imgs = _faces(tmp_path, 7, 16)
    info = pyramid.run(params)
    expected = pyramid.downsample_levels(imgs, 3)
    for level in expected:
        r = level.shape[1]
        arr = np.load(paths.pyramid_level(r), mmap_mode="r")
        assert arr.shape == (7, r, r, 3) and arr.dtype == np.uint8
        np.testing.assert_array_equal(arr, level)
    saved = json.loads((tmp_path / paths.PYRAMID_INFO).read_text())
    assert saved == info and saved["num_images"] == 7 and set(saved["levels"]) == {"4", "8", "16"}
    assert not list((tmp_path / paths.PYRAMID_DIR).glob("*.tmp*"))


def test_wrong_size_or_no_crops(tmp_path, monkeypatch):
    params = params_mod.load(write_params(tmp_path, crop__size=16,
                                          train__stages={str(r): {"batch": 4, "lr": 0.001, "transition_kimg": 0,
                                                                  "stabilize_kimg": 1} for r in (4, 8, 16)}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProganError, match="no face crops found; run `progan crop` first"):
        pyramid.run(params)
    _faces(tmp_path, 2, 8)
    with pytest.raises(ProganError, match="crop is 8x8 px but crop.size is 16"):
        pyramid.run(params)
    assert not (tmp_path / paths.pyramid_level(4)).exists()  # nothing half-written
