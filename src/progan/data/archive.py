"""Safe extraction of zip and tar (plain, gz, bz2, xz) archives.

Every member is checked before a single byte is written, and the archive is refused as a whole,
naming the member, when any of them has an absolute path, a `..` component, is a symlink or a
hardlink, a device or a fifo (the attacks `tarfile`'s own "data" filter and zip-slip guards stop).
Decompression bombs are refused from the sizes the archive declares: a total limit in bytes and a
limit on the ratio uncompressed / compressed. Reads never go past a member's declared size
(`zipfile` / `tarfile` stop there), so a lying header cannot write more than was checked.

Members are written by this module, not `extractall`: file contents only, no modes, owners or
times. The tree is built in a temp folder beside `dest` and renamed onto it at the end, so `dest`
is either the previous complete tree or the new complete one.
"""
from __future__ import annotations

import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from progan.errors import ProganError
from progan.log import log, progress

CHUNK_BYTES = 1 << 20
MAX_RATIO = 100.0            # uncompressed / compressed; JPEG archives are ~1.0, zip bombs are ~1000+
RATIO_MIN_BYTES = 1 << 20    # members smaller than this are not ratio-checked one by one (tiny text files)
MAX_MEMBERS = 5_000_000      # CelebA has 202,599 files


class CorruptArchive(ProganError):
    """The archive cannot be read (bad CRC, cut short, a name that is not what its header says)."""


@dataclass(frozen=True)
class Member:
    """One regular file or folder of an archive, already checked. `parts` is the safe relative path."""

    name: str                # as written in the archive (for messages)
    parts: tuple[str, ...]
    is_dir: bool
    size_bytes: int
    compressed_bytes: int | None  # zip only; tar members are compressed as one stream
    info: object = None           # the ZipInfo / TarInfo it came from


def kind(path: str | os.PathLike) -> str | None:
    """'zip' or 'tar' from the file's content (not its name); None for anything else."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, EOFError, tarfile.TarError):  # a truncated .gz raises instead of answering False
        return None
    return None


def safe_parts(name: str, archive: str) -> tuple[str, ...]:
    """The member's path components, or ProganError when it is absolute or climbs out with `..`.

    Backslashes count as separators too: a zip made on Windows may write `..\\evil.jpg`.
    """
    if "\x00" in name:
        raise ProganError(f"{archive}: refused member {name!r}: NUL byte in its name")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ProganError(f"{archive}: refused member {name!r}: absolute path; the archive is unsafe, not extracted")
    parts = [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]
    if ".." in parts:
        raise ProganError(f"{archive}: refused member {name!r}: '..' in its path (path traversal); "
                          f"the archive is unsafe, not extracted")
    return tuple(parts)


def _refuse(archive: str, name: str, why: str) -> ProganError:
    return ProganError(f"{archive}: refused member {name!r}: {why}; the archive is unsafe, not extracted")


def _zip_member(info: zipfile.ZipInfo, archive: str) -> Member | None:
    mode = info.external_attr >> 16  # unix st_mode when made on unix, else 0
    if stat.S_ISLNK(mode):
        raise _refuse(archive, info.filename, "it is a symlink")
    if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise _refuse(archive, info.filename, "it is a device, fifo or socket")
    if info.flag_bits & 0x1:
        raise ProganError(f"{archive}: member {info.filename!r} is encrypted; unpack the archive yourself "
                          f"and use data.source: folder")
    parts = safe_parts(info.filename, archive)
    return Member(info.filename, parts, info.is_dir(), info.file_size, info.compress_size, info) if parts else None


def _tar_member(info: tarfile.TarInfo, archive: str) -> Member | None:
    if info.issym() or info.islnk():
        raise _refuse(archive, info.name, f"it is a {'symlink' if info.issym() else 'hardlink'} to {info.linkname!r}")
    if info.ischr() or info.isblk() or info.isfifo():
        raise _refuse(archive, info.name, "it is a device or fifo")
    if not (info.isreg() or info.isdir()):
        raise _refuse(archive, info.name, f"unsupported tar member type {info.type!r}")
    parts = safe_parts(info.name, archive)
    return Member(info.name, parts, info.isdir(), info.size, None, info) if parts else None


def _members(arc, archive: str):
    """Yield the checked members in archive order; the first unsafe one raises ProganError."""
    infos = arc.infolist() if isinstance(arc, zipfile.ZipFile) else arc
    check = _zip_member if isinstance(arc, zipfile.ZipFile) else _tar_member
    for i, info in enumerate(infos):
        if i >= MAX_MEMBERS:
            raise ProganError(f"{archive}: more than {MAX_MEMBERS} members; refused as a possible archive bomb")
        member = check(info, archive)
        if member is not None:
            yield member


def check_bomb(members: list[Member], archive_bytes: int, archive: str, *,
               max_total_bytes: int, max_ratio: float = MAX_RATIO) -> int:
    """Total declared uncompressed bytes; ProganError when over `max_total_bytes` or the ratio limit."""
    if len(members) > MAX_MEMBERS:
        raise ProganError(f"{archive}: more than {MAX_MEMBERS} members; refused as a possible archive bomb")
    total = sum(m.size_bytes for m in members)
    if total > max_total_bytes:
        raise ProganError(f"{archive}: would unpack to {total / 2**20:.1f} MiB, over the limit of "
                          f"{max_total_bytes / 2**20:.1f} MiB (decompression bomb guard; raise data.max_download_mb "
                          f"if the archive is genuine)")
    for m in members:  # one hugely compressed member hides in an otherwise normal zip
        if m.compressed_bytes is not None and m.size_bytes >= RATIO_MIN_BYTES:
            if m.size_bytes > max_ratio * max(m.compressed_bytes, 1):
                raise ProganError(f"{archive}: refused member {m.name!r}: compression ratio "
                                  f"{m.size_bytes / max(m.compressed_bytes, 1):.0f}:1 is over {max_ratio:.0f}:1 "
                                  f"(decompression bomb guard)")
    if total >= RATIO_MIN_BYTES and total > max_ratio * max(archive_bytes, 1):
        raise ProganError(f"{archive}: compression ratio {total / max(archive_bytes, 1):.0f}:1 is over "
                          f"{max_ratio:.0f}:1 (decompression bomb guard)")
    return total


def _open(path: Path, fmt: str, stream: bool = False):
    if fmt == "zip":
        return zipfile.ZipFile(path)
    return tarfile.open(path, "r|*" if stream else "r:*")


def extract(archive_path: str | os.PathLike, dest: str | os.PathLike, *,
            max_total_bytes: int, max_ratio: float = MAX_RATIO, require_suffixes: frozenset[str] = frozenset()) -> int:
    """Check every member, then unpack the regular files into `dest` (replaced whole). Returns the file count.
    With `require_suffixes`, an archive with no file of those suffixes is refused before anything is written
    (so an old `dest` is not replaced by a useless tree).

    Two passes: the first reads only the headers (nothing is written when any member is refused), the
    second writes. A tar is re-read as a stream in the second pass and every member is checked again.
    """
    archive_path, dest = Path(archive_path), Path(dest)
    name = str(archive_path)
    fmt = kind(archive_path)
    if fmt is None:
        raise ProganError(f"{name}: not a zip or tar archive")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = None
    try:
        with _open(archive_path, fmt) as arc:
            members = list(_members(arc, name))
        total = check_bomb(members, archive_path.stat().st_size, name,
                           max_total_bytes=max_total_bytes, max_ratio=max_ratio)
        if require_suffixes and not any(not m.is_dir and PurePosixPath(m.parts[-1]).suffix.lower() in require_suffixes
                                        for m in members):
            raise ProganError(f"{name}: the archive holds no image files ({', '.join(sorted(require_suffixes))}); "
                              f"nothing was extracted, check data.url")
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the unpacked tree is an ordinary readable folder
        with _open(archive_path, fmt, stream=True) as arc:
            if fmt == "tar":
                members = _members(arc, name)  # same checks again, on the stream being written
            n_files = _write_members(arc, members, tmp, total, name)
        _replace_dir(tmp, dest)
        tmp = None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise CorruptArchive(f"{name}: corrupt archive ({' '.join(str(e).split())[:160]})") from None
    except UnicodeDecodeError as e:   # zipfile: a name flagged UTF-8 (general purpose bit 11) that is not UTF-8
        raise ProganError(f"{name}: a member name flagged as UTF-8 is not UTF-8 (byte 0x{e.object[e.start]:02x}); "
                          f"unpack the archive yourself and use data.source: folder") from None
    except OSError as e:
        raise ProganError(f"{name}: cannot extract to {dest} ({e.strerror or e})") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("extracted %d files (%.1f MiB) from %s into %s", n_files, total / 2**20, archive_path.name, dest)
    return n_files


def _write_members(arc, members, tmp: Path, total_bytes: int, archive: str) -> int:
    n_files = 0
    written_bytes = 0
    with progress(total=total_bytes, unit="B", unit_scale=True, desc="extract") as bar:
        for m in members:
            target = tmp.joinpath(*m.parts)
            if m.is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = arc.open(m.info) if isinstance(arc, zipfile.ZipFile) else arc.extractfile(m.info)
            with src, open(target, "wb") as out:
                while chunk := src.read(CHUNK_BYTES):
                    written_bytes += len(chunk)
                    if written_bytes > total_bytes:  # the readers stop at declared sizes; never trusted blindly
                        raise ProganError(f"{archive}: member {m.name!r} unpacks to more than the archive declared; "
                                          f"refused (decompression bomb guard)")
                    out.write(chunk)
                    bar.update(len(chunk))
            n_files += 1
    return n_files


def _replace_dir(new: Path, dest: Path) -> None:
    """Rename `new` onto `dest`; an old `dest` is moved aside first and removed after."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-old-", dir=dest.parent))
        os.replace(dest, old / "x")
    os.replace(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def member_names(path: str | os.PathLike) -> list[PurePosixPath]:
    """Safe relative paths of the regular files of an archive (checks included, nothing written)."""
    path = Path(path)
    fmt = kind(path)
    if fmt is None:
        raise ProganError(f"{path}: not a zip or tar archive")
    with _open(path, fmt) as arc:
        return [PurePosixPath(*m.parts) for m in _members(arc, str(path)) if not m.is_dir]
