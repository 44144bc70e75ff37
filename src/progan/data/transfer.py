"""Fetch one file for `progan download` (download.py): http(s) or file://, resumable, bounded, verified.

`fetch(url, dest)` writes `dest.part`, resumes it with an HTTP Range request (If-Range: the ETag or Last-Modified
seen first) after an interruption, checks the size limit, the checksums and what the source accepts (`check`),
and only then renames it to `dest`. A `dest` verified by checksum is kept as is; one without a checksum is kept
while its state file (`.<name>.source.json`) names the same URL: download.py deletes that state when the file
does not unpack, so a rerun fetches it anew instead of failing the same way.

Nothing hangs: a connection that sends nothing for TIMEOUT_S, or less than SPEED_FLOOR_BYTES_PER_S over
SPEED_WINDOW_S (curl's --speed-limit / --speed-time), is stopped with one line and the `.part` kept for a resume;
file:// opens only regular files (a named pipe would block the open forever); redirects stop after
urllib's limit, with one line.
Google Drive (the official CelebA zip) goes through gdown, which handles Drive's confirmation page.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import stat
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit

from progan.errors import ProganError
from progan.fileio import read_json, write_json
from progan.log import log, progress

SCHEMES = ("http", "https", "file")
TIMEOUT_S = 60                    # per socket operation (connect, each read)
CHUNK_BYTES = 1 << 20
# The slowest transfer kept going, as curl's --speed-limit 1024 --speed-time 60: a trickle of a few bytes per
# read would otherwise reset the per-read timeout forever. fetch(speed_floor=, speed_window_s=) overrides them.
SPEED_FLOOR_BYTES_PER_S = 1024
SPEED_WINDOW_S = 60.0
Check = Callable[[Path, str], "str | None"]   # (downloaded file, its Content-Type) -> why it is unusable, or None


def mib(nbytes: int) -> str:
    """'1,024 MiB', '3.5 MiB', '0.00195 MiB': three significant digits, whatever the size."""
    m = nbytes / 2**20
    return f"{m:,.0f} MiB" if m >= 100 else f"{m:.3g} MiB"


def one_line(text, limit: int = 160) -> str:
    """An error text from a library (urllib's redirect message runs over three lines) on one line, cut."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_state(path: Path) -> dict:
    """A small JSON state file of ours; missing or unreadable counts as empty (the work is redone)."""
    try:
        state = read_json(path)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def state_path(dest: Path) -> Path:
    """Where fetch records the URL and validator of `dest` (and of its `.part`)."""
    return dest.with_name(f".{dest.name}.source.json")


# ---------------------------------------------------------------- checksums

def file_checksums(path: Path, algos) -> dict[str, str]:
    hashers = {a: hashlib.new(a) for a in algos}
    with open(path, "rb") as f, progress(total=path.stat().st_size, unit="B", unit_scale=True,
                                         desc=f"verify {path.name}", leave=False) as bar:
        while chunk := f.read(CHUNK_BYTES):
            for h in hashers.values():
                h.update(chunk)
            bar.update(len(chunk))
    return {a: h.hexdigest() for a, h in hashers.items()}


def mismatch(path: Path, checksums: dict[str, str]) -> str | None:
    """None when every expected checksum matches, else 'md5 expected X, got Y'."""
    if not checksums:
        return None
    got = file_checksums(path, checksums)
    bad = [f"{a} expected {checksums[a]}, got {got[a]}" for a in checksums if got[a] != checksums[a]]
    return "; ".join(bad) or None


# ---------------------------------------------------------------- opening a source

@dataclass
class Opened:
    """An opened source: `stream` (None: nothing left to read), the byte it starts at, the total size when known,
    the validator to resume with, and the Content-Type the server declared ("" for file://)."""
    stream: object | None
    offset: int
    total: int | None
    validator: str | None
    content_type: str = ""


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; only http(s) is accepted here."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise ProganError(f"data.url: {req.full_url} redirects to {newurl}; only http(s) redirects are followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open_http(url: str, offset: int, validator: str | None, timeout_s: float) -> Opened:
    """Asks for the bytes from `offset` on (If-Range: the whole file when it changed meanwhile)."""
    headers = {"User-Agent": "progan-pipeline", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    try:
        resp = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # asked past the end: the part may be complete already
            m = re.match(r"bytes \*/(\d+)", e.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == offset:
                return Opened(None, offset, offset, validator)
            return _open_http(url, 0, None, timeout_s)
        if urllib.request.HTTPRedirectHandler.inf_msg in str(e.reason):   # its three-line message for a loop
            raise ProganError(f"download of {url} failed: redirect loop (HTTP {e.code} back to a URL already seen, or "
                              f"over {_HttpOnlyRedirects.max_redirections} redirects); check data.url") from None
        hint = "run the same command again to resume" if e.code >= 500 else "check data.url"
        raise ProganError(f"download of {url} failed: HTTP {e.code} {one_line(e.reason)}; {hint}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise ProganError(f"download of {url} failed ({one_line(reason)}); run the same command again to "
                          f"resume") from None
    length = resp.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    kind = resp.headers.get("Content-Type", "")
    if offset and resp.status == 206:
        m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if m and int(m.group(1)) == offset:
            total = int(m.group(2)) if m.group(2) != "*" else (offset + length if length is not None else None)
            return Opened(resp, offset, total, validator, kind)
        resp.close()
        return _open_http(url, 0, None, timeout_s)
    if offset:
        log.warning("server ignored the Range request (HTTP %d); restarting from byte 0", resp.status)
    return Opened(resp, 0, length, resp.headers.get("ETag") or resp.headers.get("Last-Modified"), kind)


def _file_kind(mode: int) -> str:
    return ("a folder" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "not a regular file")


def _open_file(url: str, offset: int, validator: str | None, timeout_s: float) -> Opened:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ProganError(f"data.url: {url} names host {parts.netloc!r}; write file:///absolute/path")
    path = Path(urllib.request.url2pathname(unquote(parts.path)))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)    # a named pipe: open() would wait for a writer forever
    except OSError as e:
        raise ProganError(f"data.url: cannot read {path} ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ProganError(f"data.url: {path} is {_file_kind(st.st_mode)}, not a regular file; point data.url at "
                          f"the archive or image file itself")
    os.set_blocking(fd, True)
    stream = os.fdopen(fd, "rb")
    current = f"{st.st_size}-{st.st_mtime_ns}"
    if offset and (validator != current or offset > st.st_size):
        offset = 0  # the source changed since the partial copy
    stream.seek(offset)
    return Opened(stream, offset, st.st_size, current)


# ---------------------------------------------------------------- fetch

def fetch(url: str, dest: str | os.PathLike, *, checksums: dict[str, str] | None = None, max_bytes: int,
          check: Check | None = None, speed_floor: float | None = None, speed_window_s: float | None = None) -> Path:
    """Download `url` to `dest` (resuming `dest.part`), verify, rename. A verified `dest` is kept as is.
    `check(part, content_type)` says why a complete download cannot be used (an HTML page, a truncated archive):
    it is then deleted, with one line. Speed floor and window: SPEED_FLOOR_BYTES_PER_S / SPEED_WINDOW_S."""
    dest, checksums = Path(dest), checksums or {}
    floor = SPEED_FLOOR_BYTES_PER_S if speed_floor is None else speed_floor
    window_s = SPEED_WINDOW_S if speed_window_s is None else speed_window_s
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise ProganError(f"data.url: scheme {scheme or '(none)'}:// is not supported; use http://, https:// or file://")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    meta_path = state_path(dest)
    meta = read_state(meta_path)
    same_url = meta.get("url") == url
    if dest.exists():
        if checksums and mismatch(dest, checksums) is None:
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
    src = opener(url, offset, meta.get("validator") if same_url else None,
                 min(TIMEOUT_S, window_s) if floor > 0 else TIMEOUT_S)
    write_json(meta_path, {"url": url, "validator": src.validator})
    if src.offset:
        log.info("resuming %s at byte %d", part, src.offset)
    if src.total is not None and src.total > max_bytes:
        if src.stream is not None:
            src.stream.close()
        part.unlink(missing_ok=True)
        raise ProganError(f"data.url: {url} is {mib(src.total)}, over data.max_download_mb "
                          f"({mib(max_bytes)}); raise it if this download is expected")
    received = _receive(src, part, max_bytes, url, floor, window_s)
    if src.total is not None and received < src.total:
        raise ProganError(f"download of {url} stopped at {received} of {src.total} bytes (connection closed); "
                          f"{part} is kept: run the same command again to resume")
    bad = mismatch(part, checksums)
    if bad:
        part.unlink()
        raise ProganError(f"checksum mismatch for {url}: {bad}; the bad download was deleted; "
                          f"check data.url and data.sha256/data.md5")
    unusable = check(part, src.content_type) if check is not None else None
    if unusable:
        part.unlink()
        meta_path.unlink(missing_ok=True)
        raise ProganError(f"download of {url}: {unusable}; the bad download was deleted: check data.url, or run the "
                          f"same command again once the server has the right file")
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    log.info("downloaded %s (%.1f MiB)", dest, dest.stat().st_size / 2**20)
    return dest


def _receive(src: Opened, part: Path, max_bytes: int, url: str, floor: float, window_s: float) -> int:
    """Append the stream to `part` from src.offset; returns the bytes in `part`. Network errors, and a transfer
    under `floor` bytes/s over `window_s`, keep `part` for a resume."""
    if src.stream is None:  # nothing left to fetch
        return src.offset
    received = src.offset
    read = getattr(src.stream, "read1", src.stream.read)    # what has arrived: a trickle returns, not blocks
    kept = f"{part} is kept: run the same command again to resume"
    with src.stream, open(part, "ab" if src.offset else "wb") as f, progress(
            total=src.total, initial=src.offset, unit="B", unit_scale=True, desc=part.name[:-len(".part")]) as bar:
        window_start, window_bytes = time.monotonic(), received
        try:
            while chunk := read(CHUNK_BYTES):
                received += len(chunk)
                if received > max_bytes:
                    f.close()
                    part.unlink()
                    raise ProganError(f"data.url: {url} is over data.max_download_mb ({mib(max_bytes)}); "
                                      f"stopped and deleted; raise it if this download is expected")
                f.write(chunk)
                bar.update(len(chunk))
                now = time.monotonic()
                if floor > 0 and now - window_start >= window_s:
                    if (received - window_bytes) / (now - window_start) < floor:
                        raise ProganError(f"download of {url} stalled: under {floor:g} bytes/s for {window_s:g} s "
                                          f"({received} bytes so far); {kept}")
                    window_start, window_bytes = now, received
        except (OSError, http.client.HTTPException) as e:  # timeouts, resets, IncompleteRead
            raise ProganError(f"download of {url} stopped at {received} bytes "
                              f"({one_line(e) or type(e).__name__}); {kept}") from None
    return received


class _TooBig(Exception):
    pass


def fetch_gdrive(file_id: str, dest: str | os.PathLike, *, checksums: dict[str, str], max_bytes: int) -> Path:
    """Download a Google Drive file with gdown (it handles Drive's confirmation page and resumes its own
    `<staging>XXXXXXXX.part`), verify, rename onto `dest`."""
    import gdown
    import requests

    dest = Path(dest)
    if dest.exists() and mismatch(dest, checksums) is None:
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
        raise ProganError(f"Google Drive file {file_id} is over data.max_download_mb ({mib(max_bytes)}); "
                          f"raise it if this download is expected") from None
    except (gdown.exceptions.DownloadError, requests.RequestException, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ProganError(f"download of Google Drive file {file_id} failed ({first}); run the same command again "
                          f"to resume, or set data.url to a mirror of {dest.name}") from None
    bad = mismatch(staging, checksums)
    if bad:
        staging.unlink()
        raise ProganError(f"checksum mismatch for Google Drive file {file_id}: {bad}; the bad download was deleted")
    os.replace(staging, dest)
    return dest
