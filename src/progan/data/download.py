"""`progan download`: fetch or list the source images and write `data/raw/images.tsv` (path, bytes).

Sources (`data.source`):
  folder  `data.folder` is listed in place; nothing is copied.
  url     `data.url` (http, https or file) is downloaded to data/raw/downloads/<name> (transfer.py: resumed,
          bounded in size and speed, checksum `data.sha256` / `data.md5`, refused when it is neither a zip/tar
          archive nor an image by its bytes, e.g. an HTML page or a truncated zip), then unpacked safely into
          data/raw/images/ when it is an archive (archive.py); a single image is listed as it is.
  cifar10 the official CIFAR-10 binary archive, its records written as PNGs (data/cifar10.py)
  lsun    an LSUN category's official LMDB export, its images written out (data/lsun.py)
  celeba  the official aligned CelebA zip (paper §6 / appendix C start from it): Google Drive via gdown,
          or `data.url` as a mirror; md5 checked against the published one unless data.md5/sha256 say otherwise.
A source is a file to fetch plus the check of what it must hold (`usable`); another source adds its own.

The list holds one row per image file (extensions IMAGE_EXTENSIONS, any case, hidden files and folders
skipped), sorted by path, paths relative to the project root when inside it else absolute, written by
paths.listed_path (a name that is not UTF-8, or holds a tab or newline, is %-escaped, never dropped), cut to
the first `data.max_images` rows when set.

Nothing failed is kept as done: a download that does not unpack and list loses its state (a rerun fetches it
again), and an archive counts as unpacked only once its list was written (the marker records the tree it made).
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from progan import paths
from progan.data import archive
from progan.data.transfer import fetch, fetch_gdrive, read_state, state_path
from progan.errors import ProganError
from progan.fileio import atomic_path, write_json
from progan.log import log

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DOWNLOADS_DIR = f"{paths.RAW_DIR}/downloads"
IMAGES_DIR = f"{paths.RAW_DIR}/images"         # where a downloaded archive is unpacked
UNPACKED_MARKER = ".progan-extracted.json"     # in IMAGES_DIR: the archive and the tree listed from it
CELEBA_DRIVE_ID = "0B7EVK8r0v71pZjFTYXZWM3FlRnM"  # img_align_celeba.zip, CelebA's official Drive folder
CELEBA_MD5 = "00d2c5bc6d35e252742224ab0c1e8fcb"   # published with the zip (202,599 JPEGs, 178x218)
CELEBA_ZIP = "img_align_celeba.zip"
EXTRACT_LIMIT_FACTOR = 4     # an archive may unpack to at most this x data.max_download_mb
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
# Compressed streams a tar comes in (tarfile "r:*"), by their first bytes
_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}


def run(params) -> int:
    """Write paths.IMAGES_LIST for `params.data`; returns the number of rows."""
    root = Path(os.path.abspath(params.root))
    data = params.data
    out = root / paths.IMAGES_LIST
    if data.source in ("cifar10", "lsun"):          # their own formats: data/cifar10.py, data/lsun.py
        from progan.data import cifar10, lsun
        files = {"cifar10": cifar10, "lsun": lsun}[data.source].images(data, root)
        return write_list(files, root, out, max_images=data.max_images)
    if data.source == "folder":
        return write_list(_folder_images(root, data.folder), root, out, max_images=data.max_images)
    checksums = _checksums(data)
    if data.source == "celeba":
        checksums = checksums or {"md5": CELEBA_MD5}
        name = CELEBA_ZIP
    else:
        name = file_name(data.url)
    dest = root / DOWNLOADS_DIR / name
    max_bytes = int(data.max_download_mb * 2**20)
    if data.url:
        fetch(data.url, dest, checksums=checksums, max_bytes=max_bytes, check=usable)
    else:
        fetch_gdrive(CELEBA_DRIVE_ID, dest, checksums=checksums, max_bytes=max_bytes)
    images_dir = root / IMAGES_DIR
    try:
        files = unpack(dest, images_dir, max_total_bytes=EXTRACT_LIMIT_FACTOR * max_bytes)
        n_rows = write_list(files, root, out, max_images=data.max_images)
    except ProganError:
        state_path(dest).unlink(missing_ok=True)   # not kept as done: a rerun fetches it again (unless verified)
        raise
    if archive.kind(dest) is not None:
        write_json(images_dir / UNPACKED_MARKER, {"archive": _stamp(dest), "tree": _tree(files)})
    return n_rows


# ---------------------------------------------------------------- listing

def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder`, recursive, hidden files and folders skipped, in walk order."""
    found = []

    def warn(err: OSError):
        log.warning("skipped unreadable %s (%s)", err.filename, err.strerror)

    for dirpath, dirnames, filenames in os.walk(folder, onerror=warn):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, f) for f in sorted(filenames)
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return found


def _folder_images(root: Path, folder: str) -> list[Path]:
    path = root / folder  # an absolute data.folder stays absolute
    if not path.is_dir():
        raise ProganError(f"data.folder: no such folder {path}; set it to a folder of images "
                          f"(relative to {root} or absolute)")
    files = list_images(path)
    if not files:
        raise ProganError(f"data.folder: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {path}")
    return files


def display_path(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """`path` relative to `root` (posix) when inside it, else absolute. No symlinks are resolved."""
    path, root = os.path.abspath(path), os.path.abspath(root)
    if path.startswith(root.rstrip(os.sep) + os.sep):
        return PurePosixPath(*Path(os.path.relpath(path, root)).parts).as_posix()
    return path


def write_list(files: list[Path], root: Path, out: Path, max_images: int | None = None) -> int:
    """Write the TSV `path<TAB>bytes` sorted by path (first `max_images` rows); returns the row count. Paths are
    paths.listed_path text: UTF-8 on one line, whatever bytes the file names hold."""
    rows = []
    for f in files:
        try:
            rows.append((paths.listed_path(display_path(f, root)), os.stat(f).st_size))
        except OSError as e:
            log.warning("skipped %s (%s)", paths.listed_path(f), e.strerror)
    rows.sort()
    if max_images is not None:
        rows = rows[:max_images]
    if not rows:
        raise ProganError(f"no readable image files to list into {out}")
    text = "path\tbytes\n" + "".join(f"{p}\t{n}\n" for p, n in rows)
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    log.info("listed %d images (%.1f MiB) in %s", len(rows), sum(n for _, n in rows) / 2**20, out)
    return len(rows)


# ---------------------------------------------------------------- the download

def _checksums(data) -> dict[str, str]:
    return {algo: data[algo].lower() for algo in ("sha256", "md5") if data[algo]}


def file_name(url: str) -> str:
    """A safe local name from the URL's last path component ('download' when it has none)."""
    name = PurePosixPath(unquote(urlsplit(url).path)).name
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".")
    return name or "download"


# ---------------------------------------------------------------- unpack

def _head(path: Path, n: int = 512) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _image_magic(head: bytes) -> bool:
    return head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def usable(path: Path, content_type: str = "") -> str | None:
    """Why a downloaded file cannot be a url / celeba source, from its bytes (not its name): None for a zip or tar
    archive (any compression) or an image; 'truncated ...' for an archive cut short; else what it looks like."""
    if archive.kind(path) is not None:
        return None
    head = _head(path)
    if _image_magic(head):
        return None
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "truncated zip archive (its central directory, at the end, is missing)"
    for magic, what in _COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            return f"truncated or corrupt {what} archive (no complete tar inside)"
    kind = content_type.split(";")[0].strip().lower()
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if "html" in kind or text.startswith((b"<!doctype html", b"<html")):
        return f"an HTML page (Content-Type {kind or 'not set'}), not an image or a zip/tar archive"
    return (f"neither a zip/tar archive nor an image (Content-Type {kind or 'not set'}, first bytes "
            f"{head[:8].hex(' ')})")


def _stamp(download: Path) -> dict:
    st = download.stat()
    return {"name": download.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _tree(files: list[Path]) -> list[int]:
    """[number of files, their total bytes]: what an unpacked tree must still hold to count as unpacked."""
    return [len(files), sum(os.stat(f).st_size for f in files)]


def unpack(download: Path, images_dir: Path, *, max_total_bytes: int) -> list[Path]:
    """The image files of a download: an archive is unpacked into `images_dir`, unless the marker run() writes
    once the list is written says this archive's tree is there whole (same archive, same files and bytes)."""
    if archive.kind(download) is None:
        why = usable(download)
        if why is None:
            return [download]
        raise ProganError(f"{download}: {why}; check data.url (the next run fetches it anew)")
    marker = read_state(images_dir / UNPACKED_MARKER)
    if marker.get("archive") == _stamp(download):
        files = list_images(images_dir)
        if _tree(files) == marker.get("tree"):
            log.info("%s already unpacked into %s", download.name, images_dir)
            return files
        log.warning("%s no longer holds what %s unpacked to; unpacking it again", images_dir, download.name)
    try:
        archive.extract(download, images_dir, max_total_bytes=max_total_bytes, require_suffixes=IMAGE_EXTENSIONS)
    except archive.CorruptArchive as e:
        download.unlink(missing_ok=True)
        raise ProganError(f"{e}; the download was deleted: run the same command again to fetch it anew") from None
    files = list_images(images_dir)
    if not files:
        raise ProganError(f"{download}: the archive holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files
