"""The bad-input corpus (issue #7): ONE table of broken or hostile inputs, each generated here (nothing is
downloaded) and run through the real CLI (`progan.cli.main`, in-process) on a copy of a small finished project
(8 real CelebA faces -> download, crop, pyramid, train --res 4), with its expected outcome:

  kept / skipped   exit 0; the crop manifest records the file as kept, or skipped with the reason
  not listed       exit 0; `progan download` does not list the file, so the crop manifest has no row for it
  exit 1           one line on stderr naming the file or key and what to do

Each case has a deadline (pytest-timeout): an input that would hang (a trickling server, a named pipe, a YAML
alias bomb) fails its case, not the whole run.

Every case also checks that nothing is lost: each file and folder the project held before the bad run
(data/raw, data/faces, data/pyramid, results/4, the source images, the bad input itself) is byte-identical unless
the outcome is to replace it (a successful crop replaces data/faces as a whole), nothing appears that the case
does not allow, no temp file is left, and no output says "Traceback".

`python tests/test_bad_input.py` prints the table as markdown.
"""
from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import os
import pickle
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import CELEBA_DIR, set_key, tiny_params, tool_env
from progan import cli
from progan.data import transfer
from progan.errors import ProganError
from test_download import JPEG, server, tar_with, zip_with  # noqa: F401  (server: real http.server on 127.0.0.1)
from test_train import NO_MLFLOW, one_thread

# Pillow's warnings are not errors here: images.py filters the bomb warning process-wide (pytest resets filters
# per test), and a corrupt EXIF block is reported by Pillow as a UserWarning while the image itself is kept.
pytestmark = [pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
              pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")]

CELEBA = sorted(CELEBA_DIR.glob("*.jpg"))
GOOD = CELEBA[:8]                  # real faces beside every bad file, so the crop stage has survivors
SIZE_PX = 16                       # crop.size of the project
T = Image.Transpose


# ---------------------------------------------------------------- outcomes

@dataclass(frozen=True)
class Kept:
    """exit 0; in/<file> kept; `check(crop)` looks at its crop (uint8 [16, 16, 3])."""
    file: str
    check: Callable[[np.ndarray], None] | None = None


@dataclass(frozen=True)
class Skipped:
    """exit 0; in/<file> skipped with `reason` (a substring of the manifest's reason)."""
    file: str
    reason: str


@dataclass(frozen=True)
class Unlisted:
    """exit 0; in/<file> is not listed by `progan download`, so crop has no row for it."""
    file: str


class Error:
    """exit 1; exactly one error line on stderr, the last, containing each of `texts` (in order)."""

    def __init__(self, *texts: str):
        self.texts = texts

    def found_in(self, line: str) -> bool:
        at = 0
        for t in self.texts:
            at = line.find(t, at)
            if at < 0:
                return False
            at += len(t)
        return True

    def __repr__(self):
        return f"Error{self.texts!r}"


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]            # after `progan`; "{ws}" is the project folder; crop runs `progan download` first
    make: Callable                   # make(ws, ctx): writes the bad input; may edit ctx.params (the params.yaml data)
    outcome: Kept | Skipped | Unlisted | Error
    params: dict = field(default_factory=dict)   # dotted params.yaml keys set before make()
    may_write: tuple[str, ...] = ()  # globs (project-relative) an exit-1 run may create; everything else stays
    after_download: Callable | None = None       # crop cases: change in/ between listing and cropping
    check: Callable | None = None    # check(ws, ctx) after the run
    server: bool = False             # needs the 127.0.0.1 http server
    note: str = ""                   # for the table


# ---------------------------------------------------------------- generated inputs

@lru_cache(maxsize=1)
def _face() -> Image.Image:
    with Image.open(CELEBA[0]) as im:
        return im.convert("RGB")


def _centre_crop(arr: np.ndarray) -> np.ndarray:
    """What crop.detector `center` gives: the largest centred square, Lanczos to crop.size."""
    h, w = arr.shape[:2]
    side = min(h, w)
    x0, y0 = (w - side) // 2, (h - side) // 2
    return np.asarray(Image.fromarray(arr[y0:y0 + side, x0:x0 + side]).resize((SIZE_PX, SIZE_PX),
                                                                             Image.Resampling.LANCZOS))


def _grey() -> np.ndarray:
    return np.asarray(_face().convert("L"))


def _near(reference: Callable[[], np.ndarray], grey: bool, mean_abs_max: float):
    """A check: the crop is within `mean_abs_max` (mean |difference|, 0..255) of the reference's crop."""
    def check(crop):
        ref = _centre_crop(reference()).astype(float)
        if grey:
            assert np.array_equal(crop[..., 0], crop[..., 1]) and np.array_equal(crop[..., 1], crop[..., 2])
            ref = ref[..., None]
        assert np.abs(crop.astype(float) - ref).mean() <= mean_abs_max
    return check


def _top_row_white(crop):
    """Rows 20-40 of the source were transparent: composited on white they are the crop's first row."""
    assert crop[0].min() >= 240, crop[0]


def _transparent_band(alpha_channel_image: Image.Image) -> Image.Image:
    alpha = np.full(_face().size[::-1], 255, np.uint8)
    alpha[20:40] = 0
    alpha_channel_image.putalpha(Image.fromarray(alpha))
    return alpha_channel_image


def _palette_transparent(path: Path) -> None:
    p = _face().quantize(255)
    idx = np.asarray(p).copy()
    idx[20:40] = 255                                          # palette entry 255: black, marked transparent
    out = Image.fromarray(idx, "P")
    out.putpalette(p.getpalette()[:255 * 3] + [0, 0, 0])
    out.save(path, transparency=255)


# Stored so that applying EXIF orientation k gives the upright face back (the inverse of exif_transpose's step).
_STORED = {1: None, 2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_90,
           7: T.TRANSVERSE, 8: T.ROTATE_270}


def _exif_oriented(k: int) -> Callable[[Path], None]:
    def write(path):
        exif = Image.Exif()
        exif[0x0112] = k
        stored = _face() if _STORED[k] is None else _face().transpose(_STORED[k])
        stored.save(path, exif=exif)                          # PNG: lossless, so the crop must match exactly
    return write


def _upright(crop):
    assert np.array_equal(crop, _centre_crop(np.asarray(_face())))


def _png_declaring(w: int, h: int) -> bytes:
    """A valid PNG header declaring w x h RGB with a few bytes of data: a decompression bomb by its size."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _corrupt_png(path):
    data = bytearray(_png_bytes(_face()))
    data[len(data) // 2] ^= 0xFF                              # one flipped byte inside the IDAT stream
    path.write_bytes(bytes(data))


def _animated(path):
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    red.save(path, save_all=True, append_images=[blue], duration=50, loop=0)


def _first_frame_red(crop):
    assert (crop[..., 0] >= 250).all() and (crop[..., 1:] <= 5).all()


def _noise(path, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (218, 178, 3), np.uint8)).save(path)


def _random_bytes(n, seed=0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, np.uint8).tobytes()


def image(name: str, write: Callable[[Path], None]) -> Callable:
    """make(): one file in/<name> written by write(path)."""
    def make(ws, ctx):
        write(ws / "in" / name)
    return make


def writes(data: bytes | Callable[[], bytes]) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data() if callable(data) else data)


def saves(convert: Callable[[], Image.Image], **kw) -> Callable[[Path], None]:
    return lambda path: convert().save(path, **kw)


# ---------------------------------------------------------------- archives and downloads

def _faces_zip(names=("img/a.jpg", "img/b.jpg")) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, f in zip(names, GOOD):
            zf.writestr(name, f.read_bytes())
    return buf.getvalue()


def url_archive(name: str, build: Callable[[Path], object]) -> Callable:
    """make(): an archive built by build(path) outside the project, as data.source url with a file:// data.url."""
    def make(ws, ctx):
        path = ctx.src / name
        build(path)
        ctx.params["data"].update(source="url", url=path.as_uri())
    return make


def _zip_bomb(path):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok/1.jpg", JPEG)
        zf.writestr("zeros.jpg", bytes(3 << 20))               # 3 MiB of zeros deflate ~1000:1


def _tar_bomb(path):
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("zeros.jpg")
        info.size = 8 << 20                                     # 8 MiB > 4 x data.max_download_mb 1
        tf.addfile(info, io.BytesIO(bytes(info.size)))


def _zip_bad_crc(path):
    data = bytearray(_faces_zip())
    data[data.find(GOOD[0].read_bytes()[:64]) + 2000] ^= 0xFF  # stored member: one byte of the JPEG flipped
    path.write_bytes(bytes(data))


def _zip_no_images(path):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("README.txt", "no pictures here\n")


def http(path: str, body: bytes | Callable[[], bytes] = _faces_zip, stop_after_bytes=None, content_type=None,
         trickle_s=None, **data) -> Callable:
    """make(): the 127.0.0.1 server serves `body` at `path` (with that Content-Type, one byte every `trickle_s`);
    data.url points there; data.* keys as given."""
    def make(ws, ctx):
        ctx.server.files[path] = body() if callable(body) else body
        ctx.server.stop_after_bytes, ctx.server.trickle_s = stop_after_bytes, trickle_s
        if content_type:
            ctx.server.types[path] = content_type
        ctx.params["data"].update(source="url", url=ctx.server.url + path, **data)
    return make


def _slow_floor(make: Callable) -> Callable:
    """make(), with the speed floor at 1000 B/s over 1 s (the defaults, 1024 B/s over 60 s, would take a minute)."""
    def slow(ws, ctx):
        ctx.monkeypatch.setattr(transfer, "SPEED_FLOOR_BYTES_PER_S", 1000)
        ctx.monkeypatch.setattr(transfer, "SPEED_WINDOW_S", 1.0)
        make(ws, ctx)
    return slow


def _redirect_loop(ws, ctx):
    ctx.server.redirects["/loop.zip"] = "/loop.zip"
    ctx.params["data"].update(source="url", url=ctx.server.url + "/loop.zip")


def _url_to_fifo(ws, ctx):
    fifo = ctx.src / "faces.zip"
    os.mkfifo(fifo)                                           # a plain open() for reading blocks until a writer
    ctx.params["data"].update(source="url", url=fifo.as_uri())


def _rerun_gets_the_good_file(ws, ctx):
    """After the refusal nothing is kept as done: once the server has the good zip, the same command lists it."""
    _bad_download_deleted(ws, ctx)
    ctx.server.files["/faces.zip"] = _faces_zip()
    cwd = os.getcwd()
    try:
        assert cli.main(["download", "--params", str(ws / "params.yaml")]) == 0
    finally:
        os.chdir(cwd)
    assert (ws / "data/raw/images.tsv").read_text().count("data/raw/images/img/") == 2


def _zip_flagged_utf8_with_latin1(path):
    """A member name with the Latin-1 byte 0xE9 although general purpose bit 11 says the name is UTF-8."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("img/caf\u00e9.jpg", JPEG)              # non-ASCII: zipfile sets the UTF-8 flag
    path.write_bytes(buf.getvalue().replace("caf\u00e9".encode(), b"caf\xe9s"))


def _latin1(name: bytes) -> str:
    """A file name holding bytes that are not UTF-8, as os.listdir returns it (surrogates); written as those bytes."""
    return os.fsdecode(name)


def _nothing_listens(ws, ctx):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx.params["data"].update(source="url", url=f"http://127.0.0.1:{port}/faces.zip")


def _bad_download_deleted(ws, ctx):
    assert not list((ws / "data/raw/downloads").glob("faces.zip*"))


def _part_kept(ws, ctx):
    part = ws / "data/raw/downloads/faces.zip.part"
    assert 0 < part.stat().st_size < len(_faces_zip())


def _nothing_outside(ws, ctx):
    assert not (ctx.src / "evil.jpg").exists() and not (ws / "data/raw/evil.jpg").exists()


# ---------------------------------------------------------------- params.yaml

def edit(fn: Callable[[dict], None]) -> Callable:
    def make(ws, ctx):
        fn(ctx.params)
    return make


def params_text(text: str | bytes | None) -> Callable:
    def make(ws, ctx):
        ctx.params = text                                       # written as is; None: no params.yaml at all
    return make


def params_rewrite(fn: Callable[[str], str | bytes]) -> Callable:
    """make(): params.yaml is fn(the good params.yaml's text), written as is."""
    def make(ws, ctx):
        ctx.params = fn(yaml.safe_dump(ctx.params, sort_keys=False))
    return make


def _seed(value: str) -> Callable[[str], str]:
    return lambda text: re.sub(r"(?m)^seed: .*$", lambda _: f"seed: {value}", text)


def _alias_bomb() -> str:
    """Billion laughs in flow style: 9 lists of 9 aliases of the list before, 9^9 'lol' once expanded (~0.5 KB)."""
    levels = ["&l0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"&l{k} [" + ", ".join([f"*l{k - 1}"] * 9) + "]" for k in range(1, 9)]
    return "[" + ", ".join(levels) + "]"


# ---------------------------------------------------------------- checkpoints

CKPT4 = "results/4/checkpoint.pt"


class Evil:
    """Pickles as `os.system("touch <marker>")`: unpickling it without weights_only runs that command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def checkpoint(path: str, change: Callable[[Path, Path, SimpleNamespace], None]) -> Callable:
    """make(): change(target, real stage-4 checkpoint, ctx) writes the bad file at ws/<path>."""
    def make(ws, ctx):
        real = ws / CKPT4
        target = ws / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if target == real:
            shutil.copyfile(real, ctx.src / "real.pt")
            real = ctx.src / "real.pt"
        change(target, real, ctx)
    return make


def _edited(**keys):
    def change(target, real, ctx):
        ck = torch.load(real, weights_only=True)
        ck.update(keys)
        torch.save(ck, target)
    return change


def _nan_in(net: str):
    """change(): the real checkpoint with one weight of `net`'s first floating tensor set to NaN."""
    def change(target, real, ctx):
        ck = torch.load(real, weights_only=True)
        name = next(k for k, v in ck[net].items() if v.is_floating_point())
        ck[net][name].view(-1)[0] = float("nan")
        torch.save(ck, target)
    return change


def _model_edited(**fields):
    def change(target, real, ctx):
        ck = torch.load(real, weights_only=True)
        ck["model"] = {**ck["model"], **fields}
        torch.save(ck, target)
    return change


def _cut(fraction):
    return lambda target, real, ctx: target.write_bytes(real.read_bytes()[: int(real.stat().st_size * fraction)])


def _evil_torch(target, real, ctx):
    torch.save({"format": "progan-checkpoint", "version": 1, "payload": Evil(ctx.marker)}, target)


def _evil_pickle(target, real, ctx):
    target.write_bytes(pickle.dumps({"format": "progan-checkpoint", "payload": Evil(ctx.marker)}, protocol=2))


def _code_did_not_run(path: str, plain_pickle: bool = False):
    """The marker was not created; and (the control) unpickling the same file WITHOUT weights_only does create it."""
    def check(ws, ctx):
        assert not ctx.marker.exists()
        data = (ws / path).read_bytes()
        if plain_pickle:
            pickle.loads(data)
        else:
            torch.load(io.BytesIO(data), weights_only=False)
        assert ctx.marker.exists(), "control: the file did not try to run code"
    return check


def _no_stage_8_output(ws, ctx):
    assert not (ws / "results/8").exists()


# ---------------------------------------------------------------- the table

def _case(id, outcome, make, argv=("crop",), **kw):
    return Case(id, tuple(argv), make, outcome, **kw)


def _in_mode(mode: str, write: Callable[[Path], None]) -> Callable[[Path], None]:
    """write(path), then make sure the file really opens in `mode` (else the case would test another mode)."""
    def checked(path):
        write(path)
        with Image.open(path) as im:
            assert im.mode == mode, (path.name, im.mode)
    return checked


def _mode_cases():
    face = _face
    colour = lambda: np.asarray(face())
    made = {
        "1": saves(lambda: face().convert("1")),
        "L": saves(lambda: face().convert("L")),
        "LA": saves(lambda: _transparent_band(face().convert("LA"))),
        "P": saves(lambda: face().quantize(256)),
        "RGBA": saves(lambda: _transparent_band(face().convert("RGBA"))),
        "CMYK": saves(lambda: face().convert("CMYK"), quality=95),
        "I;16": saves(lambda: Image.fromarray(_grey().astype(np.uint16) * 257)),
        "I": saves(lambda: Image.fromarray(_grey().astype(np.int32) * 257)),
        "F": saves(lambda: Image.fromarray(_grey().astype(np.float32) / 255)),
    }
    cases = [("1", "bilevel.png", _near(_grey, True, 4)), ("L", "grey.png", _near(_grey, True, 1)),
             ("LA", "grey_alpha.png", _top_row_white), ("P", "palette.png", _near(colour, False, 3)),
             ("RGBA", "rgba.png", _top_row_white), ("CMYK", "cmyk.jpg", _near(colour, False, 2)),
             ("I;16", "grey16.png", _near(_grey, True, 1)), ("I", "grey32.tif", _near(_grey, True, 1)),
             ("F", "float.tif", _near(_grey, True, 1))]
    return [*[_case(f"mode-{mode}", Kept(name, check), image(name, _in_mode(mode, made[mode])))
              for mode, name, check in cases],
            _case("mode-P-transparency", Kept("palette_alpha.png", _top_row_white),
                  image("palette_alpha.png", _in_mode("P", _palette_transparent)))]


def _perm_case_make(ws, ctx):
    f = ws / "in" / "unreadable.jpg"
    shutil.copyfile(CELEBA[0], f)
    f.chmod(0)


REFUSED = Error(f"{CKPT4}: refused: it holds pickled objects or code (", ") that weights_only loading does not allow")


def _build_cases() -> list[Case]:
    big = "too large (10000x10000 px > crop.max_image_pixels 89478485)"
    cases = [
        # --- images that cannot be used: skipped with the reason, the good faces kept
        _case("zero-byte-image", Skipped("empty.jpg", "empty file (0 bytes)"), image("empty.jpg", writes(b""))),
        _case("truncated-jpeg", Skipped("half.jpg", "truncated"),
              image("half.jpg", writes(lambda: CELEBA[1].read_bytes()[: CELEBA[1].stat().st_size // 2]))),
        _case("truncated-png", Skipped("half.png", "truncated"),
              image("half.png", writes(lambda: (b := _png_bytes(_face()))[: len(b) // 2]))),
        _case("corrupt-jpeg", Skipped("garbage.jpg", "truncated"),
              image("garbage.jpg", writes(lambda: b"\xff\xd8\xff\xe0" + _random_bytes(4000)))),
        _case("corrupt-png-data", Skipped("flipped.png", "cannot decode (OSError: "),
              image("flipped.png", _corrupt_png)),
        _case("corrupt-tiff-header", Skipped("broken.tif", "not an image (unknown format)"),
              image("broken.tif", writes(b"II*\x00\x08\x00\x00\x00" + b"\xff" * 50))),
        _case("text-named-jpg", Skipped("notes.jpg", "not an image (unknown format)"),
              image("notes.jpg", writes(b"this is not a picture\n"))),
        _case("html-named-png", Skipped("page.png", "not an image (unknown format)"),
              image("page.png", writes(b"<!doctype html><title>404 Not Found</title>\n"))),
        _case("zip-named-jpg", Skipped("archive.jpg", "not an image (unknown format)"),
              image("archive.jpg", writes(lambda: _faces_zip()))),
        _case("random-bytes-named-webp", Skipped("noise.webp", "not an image (unknown format)"),
              image("noise.webp", writes(lambda: _random_bytes(5000, seed=1)))),
        _case("one-pixel", Skipped("dot.png", "too small (1x1 px < crop.min_input_px 32)"),
              image("dot.png", saves(lambda: Image.new("RGB", (1, 1))))),
        _case("thin-strip", Skipped("strip.png", "too small (4000x2 px < crop.min_input_px 32)"),
              image("strip.png", saves(lambda: Image.new("RGB", (4000, 2))))),
        _case("10000x10000-image", Skipped("huge.png", big),
              image("huge.png", saves(lambda: Image.new("1", (10000, 10000)))),
              note="a real 12 kB PNG that decodes to 300 MB; refused at the default crop.max_image_pixels"),
        _case("decompression-bomb-header",
              Skipped("bomb.png", "too large (over Pillow's limit; crop.max_image_pixels 89478485)"),
              image("bomb.png", writes(_png_declaring(40000, 40000))), note="declares 40000x40000, default limit"),
        _case("fifo-named-jpg", Skipped("pipe.jpg", "not a regular file"), image("pipe.jpg", os.mkfifo),
              note="would block a reader forever"),
        _case("symlink-to-device", Skipped("zero.jpg", "not a regular file"),
              image("zero.jpg", lambda p: p.symlink_to("/dev/zero"))),
        _case("directory-named-jpg", Unlisted("folder.jpg"), image("folder.jpg", Path.mkdir)),
        _case("listed-then-replaced-by-directory", Skipped("later_dir.jpg", "is a directory"),
              image("later_dir.jpg", writes(lambda: CELEBA[0].read_bytes())),
              after_download=lambda ws: ((ws / "in/later_dir.jpg").unlink(), (ws / "in/later_dir.jpg").mkdir())),
        _case("listed-then-deleted", Skipped("gone.jpg", "file not found"),
              image("gone.jpg", writes(lambda: CELEBA[0].read_bytes())),
              after_download=lambda ws: (ws / "in/gone.jpg").unlink()),
        _case("dangling-symlink", Unlisted("dangling.jpg"),
              image("dangling.jpg", lambda p: p.symlink_to(p.parent / "nope"))),
        _case("newline-in-name", Kept("two%0Alines.jpg"),
              image("two\nlines.jpg", writes(lambda: CELEBA[0].read_bytes())),
              note="listed %-escaped in images.tsv and manifest.csv (a raw newline would break the TSV)"),
        _case("latin1-name", Kept("caf%E9.jpg", _upright), image(_latin1(b"caf\xe9.jpg"), writes(CELEBA[0].read_bytes)),
              note="real bytes caf\\xe9.jpg on disk (not UTF-8); listed %-escaped in images.tsv and manifest.csv"),
        _case("latin1-folder", Kept("Fotos-K\u00f6ln/%F6.jpg"),
              lambda ws, ctx: ((d := ws / "in" / "Fotos-K\u00f6ln").mkdir(),
                               (d / _latin1(b"\xf6.jpg")).write_bytes(CELEBA[0].read_bytes())),
              note="a UTF-8 folder name stays as it is"),
        _case("unreadable-permissions", Skipped("unreadable.jpg", "permission denied"), _perm_case_make,
              note="chmod 000; as root the run drops every capability (setpriv)"),
        _case("celeba-box-on-other-size", Skipped("square.png", "not a 178x218 aligned CelebA image (got 250x250)"),
              image("square.png", saves(lambda: _face().resize((250, 250)))), params={"crop.detector": "celeba-box"}),
        _case("no-face-in-one-image", Skipped("noise.png", "no face detected"), image("noise.png", _noise),
              params={"crop.detector": "mtcnn-torch"}),
        # --- odd but usable images: kept, and the crop shows they were read right
        *_mode_cases(),
        *[_case(f"exif-orientation-{k}", Kept(f"exif{k}.png", _upright), image(f"exif{k}.png", _exif_oriented(k)))
          for k in range(1, 9)],
        _case("exif-block-corrupt", Kept("bad_exif.jpg"),
              image("bad_exif.jpg", saves(_face, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f garbage"))),
        _case("animated-gif", Kept("anim.gif", _first_frame_red), image("anim.gif", _animated), note="first frame"),
        _case("png-data-named-jpg", Kept("png_inside.jpg", _upright),
              image("png_inside.jpg", saves(_face, format="PNG"))),
        # --- the stage cannot go on: exit 1, the previous data/faces kept
        _case("no-faces-at-all", Error("crop: only 0 of 2 images gave a face (0.0% < crop.min_kept_fraction 0.5); "
                                       "most common reason: no face detected (2x); every reason is in "
                                       ".progan/crop-failed-manifest.csv"),
              lambda ws, ctx: (shutil.rmtree(ws / "in"), (ws / "in").mkdir(), _noise(ws / "in/noise.png"),
                               Image.new("RGB", (178, 218), (128, 128, 128)).save(ws / "in/flat.png")),
              params={"crop.detector": "mtcnn-torch"}, may_write=(".progan", ".progan/crop-failed-manifest.csv")),
        _case("empty-source-folder", Error("data.folder: no image files (.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, "
                                           ".webp) in "),
              lambda ws, ctx: (shutil.rmtree(ws / "in"), (ws / "in").mkdir(), (ws / "in/readme.txt").write_text("x")),
              argv=("download",)),
        _case("missing-source-folder", Error("data.folder: no such folder"),
              edit(lambda p: p["data"].update(folder="no/such/folder")), argv=("download",)),
        # --- archives: refused as a whole, nothing extracted
        *[_case(id, Error(*(text if isinstance(text, tuple) else (text,))), url_archive(name, build),
                argv=("download",), check=_nothing_outside,
                params={"data.max_download_mb": 1},                   # archives unpack to at most 4 MiB
                may_write=("data/raw/downloads", f"data/raw/downloads/{name}",
                           f"data/raw/downloads/.{name}.source.json"))
          for id, name, build, text in [
              ("zip-path-traversal", "a.zip", lambda p: zip_with(p, "../evil.jpg"),
               "a.zip: refused member '../evil.jpg': '..' in its path (path traversal); the archive is unsafe"),
              ("zip-inner-path-traversal", "b.zip", lambda p: zip_with(p, "img/../../evil.jpg"),
               "refused member 'img/../../evil.jpg': '..' in its path (path traversal)"),
              ("tar-path-traversal", "c.tar", lambda p: tar_with(p, "../evil.jpg", tarfile.REGTYPE),
               "c.tar: refused member '../evil.jpg': '..' in its path"),
              ("zip-absolute-path", "d.zip", lambda p: zip_with(p, str(p.parent / "evil.jpg")), "absolute path"),
              ("tar-absolute-path", "e.tar", lambda p: tar_with(p, str(p.parent / "evil.jpg"), tarfile.REGTYPE),
               "absolute path; the archive is unsafe, not extracted"),
              ("zip-symlink", "f.zip", lambda p: zip_with(p, "link.jpg", stat.S_IFLNK | 0o777, b"/etc/passwd"),
               "f.zip: refused member 'link.jpg': it is a symlink"),
              ("tar-symlink", "g.tar", lambda p: tar_with(p, "link.jpg", tarfile.SYMTYPE, "/etc/passwd"),
               "refused member 'link.jpg': it is a symlink to '/etc/passwd'"),
              ("tar-hardlink", "h.tar", lambda p: tar_with(p, "hard.jpg", tarfile.LNKTYPE, "/etc/passwd"),
               "refused member 'hard.jpg': it is a hardlink to '/etc/passwd'"),
              ("tar-device", "i.tar", lambda p: tar_with(p, "dev.jpg", tarfile.CHRTYPE), "it is a device or fifo"),
              ("zip-bomb-member", "j.zip", _zip_bomb,
               ("refused member 'zeros.jpg': compression ratio ", ":1 is over 100:1 (decompression bomb guard)")),
              ("tar-gz-bomb", "k.tar.gz", _tar_bomb, ("k.tar.gz: would unpack to 8.0 MiB, over the limit of 4.0 "
               "MiB (decompression bomb guard; raise data.max_download_mb if the archive is genuine)",)),
              ("zip-member-bad-crc", "l.zip", _zip_bad_crc, "l.zip: corrupt archive (Bad CRC-32 for file 'img/a.jpg'); "
               "the download was deleted: run the same command again to fetch it anew"),
              ("zip-truncated", "m.zip", lambda p: p.write_bytes(_faces_zip()[:5000]),
               ("m.zip: truncated zip archive (its central directory, at the end, is missing); the bad download was "
                "deleted",)),
              ("zip-name-flagged-utf8-not-utf8", "o.zip", _zip_flagged_utf8_with_latin1,
               "o.zip: a member name flagged as UTF-8 is not UTF-8 (byte 0xe9); unpack the archive yourself"),
              ("zip-without-images", "n.zip", _zip_no_images, "n.zip: the archive holds no image files"),
          ]],
        # --- downloads over a real http.server on 127.0.0.1
        _case("download-checksum-mismatch",
              Error("checksum mismatch for http://127.0.0.1:", "/faces.zip: sha256 expected abab",
                    "the bad download was deleted; check data.url and data.sha256/data.md5"), argv=("download",),
              make=http("/faces.zip", sha256="ab" * 32), server=True, check=_bad_download_deleted,
              may_write=("data/raw/downloads", "data/raw/downloads/.faces.zip.source.json")),
        _case("download-server-stops-midway",
              Error("download of http://127.0.0.1:", "/faces.zip stopped at 3000 of ",
                    "faces.zip.part is kept: run the same command again to resume"), argv=("download",),
              make=http("/faces.zip", stop_after_bytes=3000), server=True, check=_part_kept,
              may_write=("data/raw/downloads", "data/raw/downloads/.faces.zip.source.json",
                         "data/raw/downloads/faces.zip.part"), note=".part kept so a re-run resumes"),
        _case("download-http-404", Error("HTTP 404 Not Found; check data.url"), argv=("download",),
              make=lambda ws, ctx: ctx.params["data"].update(source="url", url=ctx.server.url + "/nope.zip"),
              server=True, may_write=("data/raw/downloads",)),
        _case("download-nothing-listens", Error("failed ([Errno 111] Connection refused); run the same command again"),
              argv=("download",), make=_nothing_listens, server=True, may_write=("data/raw/downloads",)),
        _case("download-over-size-limit", Error("over data.max_download_mb (0.01 MiB); raise it if this download is expected"),
              argv=("download",),
              make=http("/faces.zip", max_download_mb=0.01), server=True,
              may_write=("data/raw/downloads", "data/raw/downloads/.faces.zip.source.json")),
        _case("download-trickle", Error("download of http://127.0.0.1:", "/faces.zip stalled: under 1000 bytes/s for 1 s",
                                        "faces.zip.part is kept: run the same command again to resume"),
              argv=("download",), make=_slow_floor(http("/faces.zip", trickle_s=0.25)), server=True, check=_part_kept,
              may_write=("data/raw/downloads", "data/raw/downloads/.faces.zip.source.json",
                         "data/raw/downloads/faces.zip.part"),
              note="headers, then 1 byte every 0.25 s; here the floor is 1000 B/s over 1 s (default 1024 B/s over 60 s)"),
        _case("download-redirect-loop", Error("download of http://127.0.0.1:", "/loop.zip failed: redirect loop (HTTP "
                                              "302 back to a URL already seen, or over 10 redirects); check data.url"),
              argv=("download",), make=_redirect_loop, server=True, may_write=("data/raw/downloads",)),
        _case("download-html-at-jpg-url",
              Error("download of http://127.0.0.1:", "/face.jpg: an HTML page (Content-Type text/html), not an image "
                    "or a zip/tar archive; the bad download was deleted"), argv=("download",),
              make=http("/face.jpg", b"<!DOCTYPE html>\n<html><body>Sign in to continue</body></html>\n",
                        content_type="text/html; charset=utf-8"), server=True,
              check=lambda ws, ctx: not list((ws / "data/raw/downloads").iterdir()),
              may_write=("data/raw/downloads",), note="refused at download, not listed as an image"),
        _case("download-truncated-zip-then-good",
              Error("download of http://127.0.0.1:", "/faces.zip: truncated zip archive (its central directory, at "
                    "the end, is missing); the bad download was deleted"), argv=("download",),
              make=http("/faces.zip", lambda: _faces_zip()[:3000]), server=True, check=_rerun_gets_the_good_file,
              may_write=("data/raw/downloads",), note="then the server has the good zip: the same command lists it"),
        _case("download-url-is-a-fifo", Error("data.url: ", "/src/faces.zip is a named pipe, not a regular file; point "
                                              "data.url at the archive or image file itself"),
              argv=("download",), make=_url_to_fifo, may_write=("data/raw/downloads",),
              note="a plain open() would wait for a writer forever"),
        # --- params.yaml
        _case("params-typo-key", Error("params.yaml: unknown key crop.min_confidance (allowed here: batch_images, "
                                       "detector, margin, max_image_pixels, min_confidence,"),
              edit(lambda p: p["crop"].update(min_confidance=0.9))),
        _case("params-wrong-type", Error('params.yaml: train.ema_decay must be number, got "high"'),
              edit(lambda p: set_key(p, "train.ema_decay", "high")), argv=("train", "--res", "4")),
        _case("params-size-not-power-of-two", Error("params.yaml: crop.size must be a power of two >= 8 and <= 1024, "
                                                    "got 100"),
              edit(lambda p: set_key(p, "crop.size", 100)), argv=("pyramid",)),
        _case("params-stage-missing", Error("params.yaml: train.stages has no entry for resolution 8; crop.size 16 "
                                            "needs exactly 4, 8, 16"),
              edit(lambda p: p["train"]["stages"].pop("8")), argv=("train", "--res", "8")),
        _case("params-negative-kimg", Error("params.yaml: train.stages.8.stabilize_kimg must be >= 0, got -5"),
              edit(lambda p: set_key(p, "train.stages.8.stabilize_kimg", -5)), argv=("train", "--res", "8")),
        _case("params-zero-snapshot-kimg", Error("params.yaml: train.snapshot_kimg must be > 0, got 0"),
              edit(lambda p: set_key(p, "train.snapshot_kimg", 0)), argv=("train", "--res", "4")),
        _case("params-missing-key", Error("params.yaml: missing key mlflow.experiment"),
              edit(lambda p: p["mlflow"].pop("experiment"))),
        _case("params-unknown-detector", Error('params.yaml: crop.detector must be one of "mtcnn-torch"'),
              edit(lambda p: set_key(p, "crop.detector", "haar"))),
        _case("params-ftp-url", Error("params.yaml: data.url must be an http://, https:// or file:// URL or null"),
              edit(lambda p: p["data"].update(source="url", url="ftp://example.com/faces.zip")), argv=("download",)),
        _case("params-url-source-without-url", Error("params.yaml: data.url must be set when data.source is url"),
              edit(lambda p: p["data"].update(source="url", url=None)), argv=("download",)),
        _case("params-invalid-yaml", Error("params.yaml: line 3 is not valid YAML"),
              params_text("seed: 0\ncrop: [1\n")),
        _case("params-binary-file", Error("params.yaml: a binary file, not YAML text (NUL byte at offset 8); "
                                          "params.yaml must be YAML text: restore it"),
              params_text(_png_bytes(Image.new("RGB", (4, 4)))), note="a PNG saved over it"),
        _case("params-latin1-text", Error("params.yaml: not UTF-8 text (byte 0xf6 at offset 9); params.yaml must be "
                                          "YAML text"),
              params_rewrite(lambda t: ("# Fotos K\u00f6ln\n" + t).encode("latin-1"))),
        _case("params-duplicate-key", Error("params.yaml: duplicate key crop.size (lines ", "); YAML keys must be "
                                            "unique: keep one"),
              params_rewrite(lambda t: t.replace("\n  size: 16\n", "\n  size: 16\n  size: 32\n", 1)),
              note="PyYAML alone keeps the last one silently"),
        _case("params-alias-bomb", Error("params.yaml: seed[", "] expands to over 1,000,000 nodes and characters "
                                         "through YAML aliases (an alias bomb?); write the values out"),
              params_rewrite(_seed(_alias_bomb())), note="9^9 values once expanded; refused before anything walks it"),
        _case("params-self-alias", Error("params.yaml: seed[0][1] is a YAML alias inside its own anchor (line 1): the "
                                        "value would contain itself; write it out"),
              params_rewrite(_seed("[&loop [1, *loop]]"))),
        _case("params-nested-too-deep", Error("params.yaml: line ", " is nested more than 64 levels deep"),
              params_rewrite(_seed("[" * 200_000 + "]" * 200_000)),
              note="PyYAML's scanner is quadratic in the depth of [ (minutes for this file)"),
        _case("params-absurd-batch", Error("params.yaml: train.stages.4.batch must be <= 65536, got 1000000000000"),
              edit(lambda p: set_key(p, "train.stages.4.batch", 10**12)), argv=("train", "--res", "4"),
              note="was MemoryError: Unable to allocate 7.28 TiB"),
        _case("params-not-a-mapping", Error("params.yaml: must be a YAML mapping of sections"),
              params_text("- seed\n- crop\n")),
        _case("params-file-missing", Error("params.yaml: no such params file; run from the project folder or pass "
                                           "--params PATH"), params_text(None)),
        # --- checkpoints: loaded with weights_only=True, checked, never deleted
        _case("checkpoint-other-version", Error(f"{CKPT4}: checkpoint version 2, this code reads version 1; delete it "
                                                f"and run `progan train --res 4` again"),
              checkpoint(CKPT4, _edited(version=2)), argv=("train", "--res", "8"), check=_no_stage_8_output),
        _case("checkpoint-truncated", Error(f"{CKPT4}: checkpoint is truncated or corrupt"),
              checkpoint(CKPT4, _cut(0.5)), argv=("train", "--res", "8"), check=_no_stage_8_output),
        _case("checkpoint-zero-bytes", Error(f"{CKPT4}: checkpoint is truncated or corrupt (empty file)"),
              checkpoint(CKPT4, _cut(0)), argv=("train", "--res", "8")),
        _case("checkpoint-text-file", Error(f"{CKPT4}: not a progan checkpoint (not a torch.save file"),
              checkpoint(CKPT4, lambda t, r, c: t.write_text("hello, not a checkpoint\n")),
              argv=("train", "--res", "8")),
        _case("checkpoint-foreign-torch-file", Error(f"{CKPT4}: not a progan checkpoint (format None)"),
              checkpoint(CKPT4, lambda t, r, c: torch.save({"weights": torch.zeros(3)}, t)),
              argv=("train", "--res", "8")),
        _case("checkpoint-of-another-stage", Error(f"{CKPT4}: holds the 8 px stage, expected 4 px"),
              checkpoint(CKPT4, _edited(res_px=8)), argv=("train", "--res", "8")),
        _case("checkpoint-other-model-params",
              Error(f"{CKPT4}: made with model.fmap_max 16, params.yaml has 8; a stage grows only from one trained "
                    f"with the same settings: re-run every stage from `progan train --res 4`, or restore "
                    f"model.fmap_max"),
              edit(lambda p: set_key(p, "model.fmap_max", 8)), argv=("train", "--res", "8"), check=_no_stage_8_output),
        # the official feature switches (config.py "Disable individual features"): never grown across
        _case("checkpoint-other-switch-pixel-norm",
              Error(f"{CKPT4}: made with model.pixel_norm true, params.yaml has false; a stage grows only from one",
                    "or restore model.pixel_norm"),
              edit(lambda p: set_key(p, "model.pixel_norm", False)), argv=("train", "--res", "8"),
              check=_no_stage_8_output),
        _case("checkpoint-other-switch-ema-decay",
              Error(f"{CKPT4}: made with train.ema_decay ", ", params.yaml has 0; a stage grows only from one",
                    "or restore train.ema_decay"),
              edit(lambda p: set_key(p, "train.ema_decay", 0)), argv=("train", "--res", "8"),
              check=_no_stage_8_output),
        _case("checkpoint-pickle-runs-code", REFUSED, checkpoint(CKPT4, _evil_torch),
              argv=("train", "--res", "8"), check=_code_did_not_run(CKPT4), note="marker file not created"),
        _case("checkpoint-plain-pickle-runs-code", REFUSED, checkpoint(CKPT4, _evil_pickle),
              argv=("train", "--res", "8"), check=_code_did_not_run(CKPT4, plain_pickle=True),
              note="marker file not created"),
        _case("snapshot-damaged", Error("results/4/.resume/snapshot.pt: not a progan snapshot (not a torch.save file",
                                        "delete results/4/.resume to restart the stage"),
              checkpoint("results/4/.resume/snapshot.pt", lambda t, r, c: t.write_bytes(b"\x80\x02 truncated")),
              argv=("train", "--res", "4")),
        _case("generate-pickle-runs-code", Error("evil.pt: refused: it holds pickled objects or code"),
              checkpoint("evil.pt", _evil_torch),
              argv=("generate", "--checkpoint", "{ws}/evil.pt", "--out", "{ws}/out"),
              check=_code_did_not_run("evil.pt")),
        _case("export-truncated-checkpoint", Error("cut.pt: checkpoint is truncated or corrupt"),
              checkpoint("cut.pt", _cut(0.7)), argv=("export", "--checkpoint", "{ws}/cut.pt", "--out", "{ws}/G.pt")),
        _case("checkpoint-nan-weights-generate",
              Error(f"{CKPT4}: checkpoint tensor G_ema.", " holds 1 non-finite values (NaN or inf) of ",
                    "the training diverged or the file is damaged; re-run the train stage that writes it"),
              checkpoint(CKPT4, _nan_in("G_ema")), argv=("generate", "--checkpoint", "{ws}/" + CKPT4, "--out", "{ws}/out"),
              check=lambda ws, ctx: not (ws / "out").exists(), note="was: all-black PNGs and exit 0"),
        _case("checkpoint-nan-weights-train", Error(f"{CKPT4}: checkpoint tensor G.", " holds 1 non-finite values"),
              checkpoint(CKPT4, _nan_in("G")), argv=("train", "--res", "8"), check=_no_stage_8_output),
        _case("checkpoint-latent-dim-edited",
              Error("cut.pt: model.latent_dim must be at most 16384 (32x the official 512), got 1000000000"),
              checkpoint("cut.pt", _model_edited(latent_dim=10**9)),
              argv=("generate", "--checkpoint", "{ws}/cut.pt", "--out", "{ws}/out"),
              note="was: MemoryError naming nothing"),
        _case("evaluate-other-version", Error(f"{CKPT4}: checkpoint version 2, this code reads version 1"),
              checkpoint(CKPT4, _edited(version=2)), argv=("evaluate", "--res", "4")),
        # --- damaged intermediate outputs
        _case("pyramid-corrupt-crop", Error("data/faces/images/000003.png: unreadable crop"),
              lambda ws, ctx: (ws / "data/faces/images/000003.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage"),
              argv=("pyramid",)),
        _case("pyramid-crop-of-other-size", Error("data/faces/images/000001.png: crop is 8x8 px but crop.size is 16"),
              lambda ws, ctx: Image.new("RGB", (8, 8)).save(ws / "data/faces/images/000001.png"), argv=("pyramid",)),
        _case("train-corrupt-pyramid-level", Error("data/pyramid/4.npy: not a readable .npy file"),
              lambda ws, ctx: (ws / "data/pyramid/4.npy").write_bytes(b"\x93NUMPY garbage"),
              argv=("train", "--res", "4")),
    ]
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


CASES = _build_cases()


def _lists_first(case: Case) -> bool:
    """A crop case runs `progan download` first (as the DAG does), unless params.yaml itself is the bad input."""
    return case.argv[0] == "crop" and not (isinstance(case.outcome, Error)
                                           and case.outcome.texts[0].startswith("params.yaml"))


# ---------------------------------------------------------------- the finished project every case starts from

def _cli(argv, capsys):
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A finished small project: 8 real faces in in/ -> download, crop (center), pyramid, train --res 4."""
    root = tmp_path_factory.mktemp("baseline")
    (root / "in").mkdir()
    for k, f in enumerate(GOOD):
        shutil.copyfile(f, root / "in" / f"good_{k}.jpg")
    tiny_params(root, size_px=SIZE_PX, images=Path("in"), crop__detector="center", mlflow__tracking_uri=NO_MLFLOW)
    cwd = os.getcwd()
    try:
        with one_thread():
            for argv in (["download"], ["crop"], ["pyramid"], ["train", "--res", "4"]):
                assert cli.main(argv + ["--params", str(root / "params.yaml")]) == 0, argv
    finally:
        os.chdir(cwd)
    return root


def _tree(ws: Path) -> dict[str, str]:
    """Every file and folder of the project but params.yaml: path -> sha256, 'dir', 'unreadable' or 'other'
    (links, fifos: never followed or opened)."""
    out = {}
    for p in ws.rglob("*"):
        rel = p.relative_to(ws).as_posix()
        if rel == "params.yaml":
            continue
        if p.is_symlink() or not (p.is_dir() or p.is_file()):
            out[rel] = "other"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            try:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            except PermissionError:
                out[rel] = "unreadable"
    return out


def _manifest(ws: Path) -> list[dict]:
    with open(ws / "data/faces/manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def _allowed(rel: str, globs) -> bool:
    return any(fnmatch.fnmatchcase(rel, g) for g in globs)


TEMP_NAME = re.compile(r"\.tmp|\.old-|\.part$")


def _as_root_without_capabilities(argv, ws):
    """Root reads any file whatever its mode: run the command in a process that holds no capabilities."""
    if not shutil.which("setpriv"):
        pytest.skip("running as root (which ignores chmod 000) and setpriv is missing to drop capabilities")
    drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
    probe = subprocess.run(drop + ["test", "-r", str(ws / "in" / "unreadable.jpg")], capture_output=True)
    if probe.returncode != 1:
        pytest.skip(f"running as root and setpriv cannot drop capabilities here ({probe.stderr.decode().strip()})")
    proc = subprocess.run(drop + [str(Path(sys.executable).with_name("progan")), *argv], capture_output=True,
                          text=True, env={**tool_env(), "OMP_NUM_THREADS": "1"}, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, baseline, tmp_path, monkeypatch, capsys, request):
    monkeypatch.chdir(tmp_path)                                  # the CLI changes into the project; restored after
    ws = tmp_path / "project"
    shutil.copytree(baseline, ws, symlinks=True)
    ctx = SimpleNamespace(src=tmp_path / "src", marker=tmp_path / "pwned", monkeypatch=monkeypatch,
                          server=request.getfixturevalue("server") if case.server else None,
                          params=yaml.safe_load((baseline / "params.yaml").read_text()))
    ctx.src.mkdir()
    for key, value in case.params.items():
        set_key(ctx.params, key, value)
    case.make(ws, ctx)
    if ctx.params is None:
        (ws / "params.yaml").unlink()
    elif isinstance(ctx.params, bytes):
        (ws / "params.yaml").write_bytes(ctx.params)
    else:
        (ws / "params.yaml").write_text(ctx.params if isinstance(ctx.params, str)
                                        else yaml.safe_dump(ctx.params, sort_keys=False))
    params_arg = ["--params", str(ws / "params.yaml")]
    argv = [a.replace("{ws}", str(ws)) for a in case.argv]
    if argv[0] not in cli.STANDALONE:
        argv += params_arg

    if _lists_first(case):
        rc, out, err = _cli(["download", *params_arg], capsys)   # the stage before: lists in/ into images.tsv
        assert rc == 0 and "Traceback" not in out + err, err
        if case.after_download:
            case.after_download(ws)
    before = _tree(ws)
    with one_thread():
        if case.id == "unreadable-permissions" and os.geteuid() == 0:
            rc, out, err = _as_root_without_capabilities(argv, ws)
        else:
            rc, out, err = _cli(argv, capsys)
    after = _tree(ws)

    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"progan [\w-]+: error: ", line)]
    outcome = case.outcome
    if isinstance(outcome, Error):
        assert rc == 1, err
        assert len(errors) == 1 and lines[-1] == errors[0], err
        assert outcome.found_in(errors[0]), errors[0]
        may_change = case.may_write
    else:
        assert rc == 0 and not errors, err
        may_change = ("data/faces/*",)                          # a successful crop replaces data/faces as a whole
        rows = {r["file"]: r for r in _manifest(ws)}
        assert all(rows[f"in/good_{k}.jpg"]["status"] == "kept" for k in range(len(GOOD))), rows
        kept = [r for r in rows.values() if r["status"] == "kept"]
        crops = sorted(p.name for p in (ws / "data/faces/images").iterdir())
        assert crops == [f"{k:06d}.png" for k in range(len(kept))]
        name = f"in/{outcome.file}"
        if isinstance(outcome, Unlisted):
            assert name not in rows and len(rows) == len(GOOD), rows.keys()
        else:
            assert name in rows, rows.keys()
            row = rows[name]
            if isinstance(outcome, Skipped):
                assert row["status"] == "skipped" and outcome.reason in row["reason"], row
            else:
                assert row["status"] == "kept", row
                with Image.open(ws / row["out"]) as im:
                    assert im.size == (SIZE_PX, SIZE_PX) and im.mode == "RGB"
                    crop = np.asarray(im)
                if outcome.check:
                    outcome.check(crop)

    # Nothing lost: what was there is byte-identical unless the outcome replaces it; nothing else appeared.
    changed = sorted(rel for rel, digest in before.items()
                     if after.get(rel) != digest and not _allowed(rel, may_change))
    assert not changed, f"changed or removed: {changed}"
    new = sorted(rel for rel in set(after) - set(before) if not _allowed(rel, may_change))
    assert not new, f"unexpected new files: {new}"
    temp = sorted(rel for rel in after
                  if TEMP_NAME.search(rel.rsplit("/", 1)[-1]) and not _allowed(rel, case.may_write))
    assert not temp, f"temp files left: {temp}"
    if case.check:
        case.check(ws, ctx)


def test_corpus_covers_every_kind_the_issue_names():
    ids = {c.id for c in CASES}
    assert len(CASES) >= 40
    for mode in ("1", "L", "LA", "P", "RGBA", "CMYK", "I;16", "F"):
        assert f"mode-{mode}" in ids
    assert {f"exif-orientation-{k}" for k in range(1, 9)} <= ids


@pytest.mark.parametrize("command, sizes", [
    (["pyramid"], "pyramid.chunk_images (now 2048), crop.size (now 16)"),
    (["train", "--res", "8"], "train.stages.8.batch (now 8), model.latent_dim (now 16), model.fmap_max (now 16)"),
])
def test_out_of_memory_in_a_stage_names_its_params_keys(command, sizes, baseline, tmp_path, monkeypatch, capsys):
    """A MemoryError escaping a stage (numpy's "Unable to allocate ...") is one line naming the params.yaml keys
    that size that stage's memory, with their values (the stage is replaced by one that raises it)."""
    import importlib

    from progan import pipeline

    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "project"
    shutil.copytree(baseline, ws, symlinks=True)
    detail = "Unable to allocate 7.28 TiB for an array with shape (1000000000000,) and data type int64"

    def stage(params, **kwargs):
        raise MemoryError(detail)

    monkeypatch.setattr(importlib.import_module(pipeline.STAGES[command[0]].module), "run", stage)
    rc, _, err = _cli([*command, "--params", str(ws / "params.yaml")], capsys)
    assert rc == 1 and err.strip().splitlines()[-1] == (
        f"progan {command[0]}: error: out of memory ({detail}); the sizes it takes from params.yaml: {sizes}; "
        f"lower them (or free memory) and run it again")


def test_debug_shows_the_error_itself(tmp_path, monkeypatch):
    """Tracebacks only with --debug: the same bad params.yaml raises instead of printing one line."""
    monkeypatch.chdir(tmp_path)
    path = tiny_params(tmp_path, size_px=SIZE_PX, crop__size=100)
    with pytest.raises(ProganError, match="crop.size must be a power of two"):
        cli.main(["crop", "--params", str(path), "--debug"])


# ---------------------------------------------------------------- the table as markdown

def _describe(outcome) -> str:
    if isinstance(outcome, Kept):
        return "exit 0, kept"
    if isinstance(outcome, Skipped):
        return f"exit 0, skipped: {outcome.reason}"
    if isinstance(outcome, Unlisted):
        return "exit 0, not listed by download (no manifest row)"
    return "exit 1: " + " … ".join(outcome.texts)


def table_markdown() -> str:
    rows = ["| case | command | outcome | nothing lost |", "|---|---|---|---|"]
    for c in CASES:
        command = " ".join(["progan", *(a.replace("{ws}", "PROJECT") for a in c.argv)])
        if _lists_first(c):
            command = f"progan download; {command}"
        outcome = _describe(c.outcome) + (f" ({c.note})" if c.note else "")
        if isinstance(c.outcome, Error):
            files = [g for g in c.may_write if not any(h.startswith(g + "/") for h in c.may_write)]
            lost = "every earlier file identical" + (f"; writes only {', '.join(files)}" if files else "")
        else:
            lost = "data/faces replaced whole; sources, pyramid, checkpoint identical"
        cells = [c.id, f"`{command}`", outcome, lost]
        rows.append("| " + " | ".join(x.replace("|", "\\|").replace("\n", "\\n") for x in cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table_markdown())
