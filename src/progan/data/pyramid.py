"""The resolution pyramid: data/pyramid/<res>.npy for res = 4, 8, ..., crop.size.

Each level is one uint8 .npy array [N, res, res, 3] that training reads by memmap. It is written front to
back with plain writes (header, then chunk after chunk), not through a memmap: a full disk is then an ENOSPC
error (fileio.atomic_path turns it into one line naming the level) rather than a SIGBUS on a sparse page.
As the official `dataset_tool.py` (tkarras/progressive_growing_of_gans, TFRecordExporter.add_image) does,
each level is the 2x2 box average of the level above computed in float32 from the *unrounded* values, and
only the stored copy is rounded (np.rint, clip).
Images stream through in chunks of `pyramid.chunk_images`, so data larger than RAM works.
"""
from __future__ import annotations

import contextlib
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from progan import paths
from progan.errors import ProganError
from progan.fileio import atomic_path, sha256_file, write_json
from progan.log import log, progress


def downsample_levels(top: np.ndarray, num_levels: int) -> list[np.ndarray]:
    """[N, R, R, 3] uint8 -> uint8 levels at R, R/2, ..., R/2^(num_levels-1) (official rounding)."""
    levels = [top]
    img = top.astype(np.float32)
    for _ in range(num_levels - 1):
        img = (img[:, 0::2, 0::2] + img[:, 0::2, 1::2] + img[:, 1::2, 0::2] + img[:, 1::2, 1::2]) * 0.25
        levels.append(np.rint(img).clip(0, 255).astype(np.uint8))
    return levels


def _load_png(path: Path, size_px: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except OSError as e:
        raise ProganError(f"{path}: unreadable crop ({e}); re-run `progan crop`") from None
    if arr.shape != (size_px, size_px, 3):
        raise ProganError(f"{path}: crop is {arr.shape[1]}x{arr.shape[0]} px but crop.size is {size_px}; "
                          f"re-run `progan crop`")
    return arr



def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The .npy header of a C-order uint8 array (the bytes np.lib.format.open_memmap writes)."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def _write_all(f, tmp: Path, data) -> None:
    """Write every byte of `data` to the unbuffered file `f` (the temp file `tmp`). An OSError is tagged with
    `tmp`, so that atomic_path names the level that failed, not the last level opened."""
    view = memoryview(data).cast("B")
    try:
        while view:
            view = view[f.write(view):]
    except OSError as e:
        e.filename = e.filename or str(tmp)
        raise


def run(params) -> dict:
    t0 = time.time()
    size_px = int(params.crop.size)
    resolutions = params.levels  # 4 .. size_px, whatever stage training starts at (train.start_px)
    files = sorted(Path(paths.FACES_IMAGES_DIR).glob("*.png"))
    if not files:
        raise ProganError(f"{paths.FACES_IMAGES_DIR}: no face crops found; run `progan crop` first")
    n = len(files)
    chunk = int(params.pyramid.chunk_images)
    log.info("pyramid: %d crops at %d px -> levels %s", n, size_px, resolutions)

    with contextlib.ExitStack() as stack:
        tmp_paths = {r: stack.enter_context(atomic_path(paths.pyramid_level(r), suffix=".npy")) for r in resolutions}
        outs = {r: stack.enter_context(open(tmp_paths[r], "wb", buffering=0)) for r in resolutions}
        for r in resolutions:
            _write_all(outs[r], tmp_paths[r], _npy_header((n, r, r, 3)))
        with ThreadPoolExecutor(max_workers=4) as pool, progress(total=n, desc="pyramid", unit="img") as bar:
            for start in range(0, n, chunk):
                batch = files[start:start + chunk]
                top = np.stack(list(pool.map(lambda p: _load_png(p, size_px), batch)))
                for level in downsample_levels(top, len(resolutions)):
                    r = level.shape[1]
                    _write_all(outs[r], tmp_paths[r], np.ascontiguousarray(level).data)
                bar.update(len(batch))
        # Leaving the ExitStack closes the files and renames every level into place (all of them, or none on error).
    info = {
        "num_images": n,
        "size_px": size_px,
        "levels": {str(r): {"path": paths.pyramid_level(r), "shape": [n, r, r, 3], "dtype": "uint8",
                            "sha256": sha256_file(paths.pyramid_level(r))} for r in resolutions},
    }
    write_json(paths.PYRAMID_INFO, info)
    mb = sum(n * r * r * 3 for r in resolutions) / 1e6
    secs = time.time() - t0
    log.info("pyramid: wrote %.1f MB in %.1f s (%.1f MB/s)", mb, secs, mb / max(secs, 1e-9))
    return info
