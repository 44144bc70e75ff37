"""`progan download`: fetch or list the source images and write `data/raw/images.tsv` (path, bytes).

Sources (`data.source`):
  folder  `data.folder` is listed in place; nothing is copied.
  url     `data.url` (http, https or file) is downloaded to data/raw/downloads/<name> through `<name>.part`,
          resumed with an HTTP Range request after an interruption, renamed only once the checksum
          (`data.sha256` / `data.md5`) matches, then unpacked safely into data/raw/images/ when it is an
          archive (see archive.py); a single image is listed as it is.
  cifar10 the official CIFAR-10 binary archive, its records written as PNGs (data/cifar10.py)
  lsun    an LSUN category's official LMDB export, its images written out (data/lsun.py)
  celeba  the official aligned CelebA zip (paper §6 / appendix C start from it): Google Drive via gdown,
          or `data.url` as a mirror; md5 checked against the published one unless data.md5/sha256 say otherwise.

The list holds one row per image file (extensions IMAGE_EXTENSIONS, any case, hidden files and folders
skipped), sorted by path, paths relative to the project root when inside it else absolute, cut to the
first `data.max_images` rows when set.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from progan import paths
from progan.data import archive
from progan.errors import ProganError
from progan.fileio import atomic_path, read_json, write_json
from progan.log import log, progress

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DOWNLOADS_DIR = f"{paths.RAW_DIR}/downloads"
IMAGES_DIR = f"{paths.RAW_DIR}/images"         # where a downloaded archive is unpacked
CELEBA_DRIVE_ID = "0B7EVK8r0v71pZjFTYXZWM3FlRnM"  # img_align_celeba.zip, CelebA's official Drive folder
CELEBA_MD5 = "00d2c5bc6d35e252742224ab0c1e8fcb"   # published with the zip (202,599 JPEGs, 178x218)
CELEBA_ZIP = "img_align_celeba.zip"
EXTRACT_LIMIT_FACTOR = 4     # an archive may unpack to at most this x data.max_download_mb
SCHEMES = ("http", "https", "file")
TIMEOUT_S = 60               # per socket operation, not for the whole transfer
CHUNK_BYTES = 1 << 20
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _mib(nbytes: int) -> str:
    """'1,024 MiB', '3.5 MiB', '0.00195 MiB': three significant digits, whatever the size."""
    mib = nbytes / 2**20
    return f"{mib:,.0f} MiB" if mib >= 100 else f"{mib:.3g} MiB"


def run(params) -> int:
    """Write paths.IMAGES_LIST for `params.data`; returns the number of rows."""
    root = Path(os.path.abspath(params.root))
    data = params.data
    if data.source in ("cifar10", "lsun"):          # their own formats: data/cifar10.py, data/lsun.py
        from progan.data import cifar10, lsun
        files = {"cifar10": cifar10, "lsun": lsun}[data.source].images(data, root)
    elif data.source == "folder":
        files = _folder_images(root, data.folder)
    else:
        checksums = _checksums(data)
        if data.source == "celeba":
            checksums = checksums or {"md5": CELEBA_MD5}
            name = CELEBA_ZIP
        else:
            name = file_name(data.url)
        dest = root / DOWNLOADS_DIR / name
        max_bytes = int(data.max_download_mb * 2**20)
        if data.url:
            fetch(data.url, dest, checksums=checksums, max_bytes=max_bytes)
        else:
            fetch_gdrive(CELEBA_DRIVE_ID, dest, checksums=checksums, max_bytes=max_bytes)
        files = unpack(dest, root / IMAGES_DIR, max_total_bytes=EXTRACT_LIMIT_FACTOR * max_bytes)
    return write_list(files, root, root / paths.IMAGES_LIST, max_images=data.max_images)


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
    """Write the TSV `path<TAB>bytes` sorted by path (first `max_images` rows); returns the row count."""
    rows, odd = [], 0
    for f in files:
        shown = display_path(f, root)
        if any(c in shown for c in "\t\n\r"):  # would break the TSV
            odd += 1
            continue
        try:
            rows.append((shown, os.stat(f).st_size))
        except OSError as e:
            log.warning("skipped %s (%s)", f, e.strerror)
    if odd:
        log.warning("skipped %d files whose names hold a tab or newline", odd)
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


# ---------------------------------------------------------------- checksums

def _checksums(data) -> dict[str, str]:
    return {algo: data[algo].lower() for algo in ("sha256", "md5") if data[algo]}


def file_checksums(path: Path, algos) -> dict[str, str]:
    hashers = {a: hashlib.new(a) for a in algos}
    with open(path, "rb") as f, progress(total=path.stat().st_size, unit="B", unit_scale=True,
                                         desc=f"verify {path.name}", leave=False) as bar:
        while chunk := f.read(CHUNK_BYTES):
            for h in hashers.values():
                h.update(chunk)
            bar.update(len(chunk))
    return {a: h.hexdigest() for a, h in hashers.items()}


def _mismatch(path: Path, checksums: dict[str, str]) -> str | None:
    """None when every expected checksum matches, else 'md5 expected X, got Y'."""
    if not checksums:
        return None
    got = file_checksums(path, checksums)
    bad = [f"{a} expected {checksums[a]}, got {got[a]}" for a in checksums if got[a] != checksums[a]]
    return "; ".join(bad) or None


# ---------------------------------------------------------------- download

def file_name(url: str) -> str:
    """A safe local name from the URL's last path component ('download' when it has none)."""
    name = PurePosixPath(unquote(urlsplit(url).path)).name
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".")
    return name or "download"


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; only http(s) is accepted here."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise ProganError(f"data.url: {req.full_url} redirects to {newurl}; only http(s) redirects are followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open_http(url: str, offset: int, validator: str | None):
    """(stream, start offset, total bytes or None, validator). Asks for the bytes from `offset` on."""
    headers = {"User-Agent": "progan-pipeline", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator  # the server sends the whole file if it changed meanwhile
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    try:
        resp = opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # asked past the end: the part may be complete already
            m = re.match(r"bytes \*/(\d+)", e.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == offset:
                return None, offset, offset, validator
            return _open_http(url, 0, None)
        hint = "run the same command again to resume" if e.code >= 500 else "check data.url"
        raise ProganError(f"download of {url} failed: HTTP {e.code} {e.reason}; {hint}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise ProganError(f"download of {url} failed ({reason}); run the same command again to resume") from None
    length = resp.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if offset and resp.status == 206:
        m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if m and int(m.group(1)) == offset:
            total = int(m.group(2)) if m.group(2) != "*" else (offset + length if length is not None else None)
            return resp, offset, total, validator
        resp.close()
        return _open_http(url, 0, None)
    if offset:
        log.warning("server ignored the Range request (HTTP %d); restarting from byte 0", resp.status)
    return resp, 0, length, resp.headers.get("ETag") or resp.headers.get("Last-Modified")


def _open_file(url: str, offset: int, validator: str | None):
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ProganError(f"data.url: {url} names host {parts.netloc!r}; write file:///absolute/path")
    path = Path(urllib.request.url2pathname(unquote(parts.path)))
    try:
        stream = open(path, "rb")
        st = os.fstat(stream.fileno())
    except OSError as e:
        raise ProganError(f"data.url: cannot read {path} ({e.strerror})") from None
    current = f"{st.st_size}-{st.st_mtime_ns}"
    if offset and (validator != current or offset > st.st_size):
        offset = 0  # the source changed since the partial copy
    stream.seek(offset)
    return stream, offset, st.st_size, current


def fetch(url: str, dest: str | os.PathLike, *, checksums: dict[str, str] | None = None,
          max_bytes: int) -> Path:
    """Download `url` to `dest` (resuming `dest.part`), verify, rename. A verified `dest` is kept as is."""
    dest, checksums = Path(dest), checksums or {}
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise ProganError(f"data.url: scheme {scheme or '(none)'}:// is not supported; use http://, https:// or file://")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    meta_path = dest.with_name(f".{dest.name}.source.json")
    meta = _read_state(meta_path)
    same_url = meta.get("url") == url
    if dest.exists():
        if checksums and _mismatch(dest, checksums) is None:
            log.info("%s already downloaded and verified", dest)
            return dest
        if not checksums and same_url:
            log.info("%s already downloaded from %s (no checksum set)", dest, url)
            return dest
        log.warning("%s is stale or fails its checksum; downloading it again", dest)
        dest.unlink()
    if part.exists() and not same_url:
        part.unlink()
    offset = part.stat().st_size if part.exists() else 0
    opener = _open_file if scheme == "file" else _open_http
    stream, offset, total, validator = opener(url, offset, meta.get("validator") if same_url else None)
    write_json(meta_path, {"url": url, "validator": validator})
    if offset:
        log.info("resuming %s at byte %d", part, offset)
    if total is not None and total > max_bytes:
        _close(stream)
        part.unlink(missing_ok=True)
        raise ProganError(f"data.url: {url} is {_mib(total)}, over data.max_download_mb "
                          f"({_mib(max_bytes)}); raise it if this download is expected")
    received = _receive(stream, part, offset, total, max_bytes, url)
    if total is not None and received < total:
        raise ProganError(f"download of {url} stopped at {received} of {total} bytes (connection closed); "
                          f"{part} is kept: run the same command again to resume")
    bad = _mismatch(part, checksums)
    if bad:
        part.unlink()
        raise ProganError(f"checksum mismatch for {url}: {bad}; the bad download was deleted; "
                          f"check data.url and data.sha256/data.md5")
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    log.info("downloaded %s (%.1f MiB)", dest, dest.stat().st_size / 2**20)
    return dest


def _read_state(path: Path) -> dict:
    """A small JSON state file of ours; missing or unreadable counts as empty (the work is redone)."""
    try:
        state = read_json(path)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _close(stream) -> None:
    if stream is not None:
        stream.close()


def _receive(stream, part: Path, offset: int, total: int | None, max_bytes: int, url: str) -> int:
    """Append the stream to `part` from `offset`; returns the bytes in `part`. Network errors keep `part`."""
    if stream is None:  # nothing left to fetch
        return offset
    received = offset
    with stream, open(part, "ab" if offset else "wb") as f, progress(
            total=total, initial=offset, unit="B", unit_scale=True, desc=part.name[:-len(".part")]) as bar:
        try:
            while chunk := stream.read(CHUNK_BYTES):
                received += len(chunk)
                if received > max_bytes:
                    f.close()
                    part.unlink()
                    raise ProganError(f"data.url: {url} is over data.max_download_mb ({_mib(max_bytes)}); "
                                      f"stopped and deleted; raise it if this download is expected")
                f.write(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:  # timeouts, resets, IncompleteRead
            raise ProganError(f"download of {url} stopped at {received} bytes ({str(e) or type(e).__name__}); "
                              f"{part} is kept: run the same command again to resume") from None
    return received


class _TooBig(Exception):
    pass


def fetch_gdrive(file_id: str, dest: str | os.PathLike, *, checksums: dict[str, str], max_bytes: int) -> Path:
    """Download a Google Drive file with gdown (it handles Drive's confirmation page and resumes its own
    `<staging>XXXXXXXX.part`), verify, rename onto `dest`."""
    import gdown
    import requests

    dest = Path(dest)
    if dest.exists() and _mismatch(dest, checksums) is None:
        log.info("%s already downloaded and verified", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(dest.name + ".gdown")

    def limit(done_bytes: int, total_bytes: int | None):
        if max(done_bytes, total_bytes or 0) > max_bytes:
            raise _TooBig

    try:
        gdown.download(id=file_id, output=str(staging), quiet=False, resume=True, timeout=TIMEOUT_S,
                       retries=3, progress=limit)
    except _TooBig:
        for p in dest.parent.glob(f"{staging.name}*.part"):
            p.unlink()
        raise ProganError(f"Google Drive file {file_id} is over data.max_download_mb ({_mib(max_bytes)}); "
                          f"raise it if this download is expected") from None
    except (gdown.exceptions.DownloadError, requests.RequestException, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ProganError(f"download of Google Drive file {file_id} failed ({first}); run the same command again "
                          f"to resume, or set data.url to a mirror of {dest.name}") from None
    bad = _mismatch(staging, checksums)
    if bad:
        staging.unlink()
        raise ProganError(f"checksum mismatch for Google Drive file {file_id}: {bad}; the bad download was deleted")
    os.replace(staging, dest)
    return dest


# ---------------------------------------------------------------- unpack

def is_image(path: Path) -> bool:
    """By extension, else by the first bytes (JPEG, PNG, GIF, BMP, TIFF, WebP)."""
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    with open(path, "rb") as f:
        head = f.read(12)
    return head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def unpack(download: Path, images_dir: Path, *, max_total_bytes: int) -> list[Path]:
    """The image files of a download: an archive is unpacked into `images_dir` (once per archive file)."""
    if archive.kind(download) is None:
        if is_image(download):
            return [download]
        raise ProganError(f"{download}: neither a zip/tar archive nor an image; check data.url")
    st = download.stat()
    stamp = {"archive": download.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    marker = images_dir / ".progan-extracted.json"
    if _read_state(marker) == stamp:
        log.info("%s already unpacked into %s", download.name, images_dir)
    else:
        archive.extract(download, images_dir, max_total_bytes=max_total_bytes, require_suffixes=IMAGE_EXTENSIONS)
        write_json(marker, stamp)
    files = list_images(images_dir)
    if not files:
        raise ProganError(f"{download}: the archive holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files
