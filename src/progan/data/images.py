"""Safe image loading for real, messy input: any file Pillow can read in, uint8 RGB [H, W, 3] out.

A file that cannot be used raises `ImageError` with a short `reason` ("empty file (0 bytes)", "truncated",
"not an image (unknown format)", ...); the crop stage records the reason in its manifest and skips the file.
Handled on purpose: EXIF orientation, every Pillow mode (alpha composited on white, 16-bit and float grey
rescaled, CMYK / palette / 1-bit converted), content that does not match the extension (PNG data named .jpg),
WEBP, animated GIF / APNG (first frame), and the decompression-bomb guard. `conversion_notes` says which of these a
file gets (the crop manifest's notes).

`decode(path, keep_px=N)` decodes a large JPEG reduced (Pillow's draft mode: the JPEG decoder scales the DCT by
1/2, 1/4 or 1/8, so the full-size pixels are never held): only when its long side is at least 2N, and never
below N. A 9000x9000 px photo (243 MB of pixels) becomes 2250x2250 (15 MB) for a detector that looks at 2048 px.
"""
from __future__ import annotations

import os
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485    # params.yaml crop.max_image_pixels (Pillow's Image.MAX_IMAGE_PIXELS)
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white
DRAFT_SCALES = (8, 4, 2)            # the reductions libjpeg's scaled IDCT gives through Image.draft
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# Errors Pillow's decoders raise for corrupt data (besides UnidentifiedImageError, an OSError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, ZeroDivisionError,
                  MemoryError, Image.DecompressionBombError)


# Pillow warns above its own MAX_IMAGE_PIXELS; load_rgb's explicit check decides instead. A module-level
# filter, because warnings.catch_warnings() is not thread-safe and load_rgb runs in decoder threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Pillow's UserWarnings about broken metadata ("Corrupt EXIF data. Expecting to read 12 bytes ...") name no
# file and change nothing here: a broken EXIF block leaves the image as stored (_orient), and what is kept or
# skipped, with the reason, is in the crop manifest. Module-level for the same reason.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


class ImageError(Exception):
    """A file that cannot be used as an image. `reason` is a short phrase for the crop manifest."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _too_large(w: int, h: int, max_pixels: int) -> ImageError:
    return ImageError(f"too large ({w}x{h} px > crop.max_image_pixels {max_pixels})")


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if "truncated" in text.lower():
        return "truncated"
    return f"cannot decode ({type(e).__name__}: {text[:80]})" if text else f"cannot decode ({type(e).__name__})"


def _check_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as e:
        raise ImageError(f"cannot stat ({e.strerror or type(e).__name__})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError("is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("not a regular file")
    if st.st_size == 0:
        raise ImageError("empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise ImageError("permission denied")


def _orient(im: Image.Image) -> Image.Image:
    """Apply the EXIF Orientation tag; a broken EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(im)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError, struct.error):
        return im


def _grey_to_rgb(im: Image.Image) -> np.ndarray:
    """I / I;16* / F (16-bit or float grey): rescale to 0..255. I;16 and I above 255: / 65535 * 255;
    F within [0, 1]: * 255; anything else: min..max stretched to 0..255."""
    a = np.nan_to_num(np.asarray(im).astype(np.float64))
    lo, hi = 0.0, 255.0
    if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
        hi = 65535.0
    if im.mode == "F" and not (a.min(initial=0) >= 0 and a.max(initial=0) <= 1):
        lo, hi = a.min(initial=0), a.max(initial=1)
    elif im.mode == "F":
        hi = 1.0
    if a.min(initial=0) < lo or a.max(initial=0) > hi:    # I with negative values or beyond 16 bits
        lo, hi = a.min(initial=0), a.max(initial=1)
    g = np.clip((a - lo) / max(hi - lo, 1e-12) * 255 + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 RGB [H, W, 3] (contiguous)."""
    if im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return np.ascontiguousarray(np.asarray(Image.alpha_composite(background, rgba).convert("RGB")))
    if im.mode.startswith("I") or im.mode == "F":
        return _grey_to_rgb(im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im))


def conversion_notes(path: str | os.PathLike) -> list[str]:
    """What load_rgb does to this file besides decoding, as short notes for the crop manifest (read from the header:
    nothing is decoded); [] for a plain RGB image or a file Pillow cannot open."""
    try:
        with Image.open(path) as im:
            mode, notes = im.mode, []
            if mode in _ALPHA_MODES or (mode == "P" and "transparency" in im.info):
                notes.append(f"{mode} with transparency: alpha composited on white")
            elif mode.startswith("I;16"):
                notes.append(f"16-bit grey ({mode}) rescaled to 8 bits")
            elif mode in ("I", "F"):
                notes.append(f"{'32-bit integer' if mode == 'I' else 'float'} grey ({mode}) mapped to 8 bits")
            elif mode != "RGB":
                notes.append(f"{mode} converted to RGB")
            try:
                orientation = im.getexif().get(0x0112, 1)
            except Exception:      # noqa: BLE001 - a broken EXIF block: _orient leaves the image as stored
                orientation = 1
            if orientation not in (1, None) and 1 <= int(orientation) <= 8:
                notes.append(f"EXIF orientation {orientation} applied")
            if getattr(im, "n_frames", 1) > 1:
                notes.append(f"first of {im.n_frames} frames")
            suffix = Path(path).suffix.lower()
            if im.format and suffix and suffix.lstrip(".") not in _FORMAT_SUFFIXES.get(im.format, (im.format.lower(),)):
                notes.append(f"{im.format} data named {suffix}")
            return notes
    except Exception:              # noqa: BLE001 - notes only; load_rgb reports what is wrong with the file
        return []


_FORMAT_SUFFIXES = {"JPEG": ("jpg", "jpeg", "jpe", "jfif"), "TIFF": ("tif", "tiff"), "PNG": ("png", "apng")}


@dataclass
class Decoded:
    """A decoded image: uint8 RGB [h, w, 3] at 1/`scale` of the full image, which is `full_wh` px (EXIF-oriented)."""
    image: np.ndarray
    full_wh: tuple[int, int]
    scale: int = 1


def draft_scale(w: int, h: int, keep_px: int | None) -> int:
    """The largest of 8, 4, 2 that keeps the long side of a w x h image at >= keep_px, else 1."""
    if not keep_px:
        return 1
    return next((s for s in DRAFT_SCALES if max(w, h) // s >= keep_px), 1)


def load_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode `path` (first frame, EXIF-oriented) to uint8 RGB [H, W, 3]; raise ImageError(reason) for any
    file that is missing, empty, not an image, truncated, corrupt or larger than `max_pixels`."""
    return decode(path, max_pixels).image


def decode(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, *, keep_px: int | None = None,
           scale: int | None = None, reserve: Callable[[int], None] | None = None) -> Decoded:
    """load_rgb, reduced: a JPEG is decoded at 1/draft_scale(w, h, keep_px), or at 1/`scale` when given (other
    formats in full). `reserve(nbytes)` is called with the decoded pixels' size before they are allocated
    (readahead.Ticket.reserve). `max_pixels` applies to the full size."""
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise _too_large(w, h, max_pixels)
            s = scale or draft_scale(w, h, keep_px)
            if s > 1 and im.format == "JPEG":
                im.draft(None, (max(1, w // s), max(1, h // s)))
            stored = im.size
            if reserve is not None:
                reserve(stored[0] * stored[1] * 3)
            im.load()
            rgb = to_rgb(_orient(im))
            full = (w, h) if rgb.shape[1::-1] == stored else (h, w)        # EXIF turned it 90 degrees
            return Decoded(rgb, full, max(1, round(w / stored[0])))
    except UnidentifiedImageError:
        raise ImageError("not an image (unknown format)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"too large (over Pillow's limit; crop.max_image_pixels {max_pixels})") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except _DECODE_ERRORS as e:
        raise ImageError(_short(e)) from None
