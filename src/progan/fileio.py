"""Atomic file writes: every output is written to a temp file in the same folder, then renamed.

A killed process leaves either the old file or the new one, never half of one. Its temp file
(`.<name>.tmp-<pid>-XXXXXXXX<suffix>`) is removed by the next write of the same file, once that pid is gone.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

from progan.errors import ProganError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

_WRITING: set[str] = set()   # temp files this process is writing now


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync and rename it onto `path`, else delete it.

    `suffix` keeps extensions that writers look at (np.save adds .npy, PIL picks the format).
    A full disk or quota (ENOSPC, EDQUOT, also when wrapped, as torch.save does) becomes a one-line ProganError
    naming `path`; the previous `path` is untouched and the temp file is gone. An OSError whose `filename` names
    another file's temp passes through to that file's atomic_path (nested ones, as in the pyramid).
    """
    path = Path(path)
    existed = path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    _WRITING.add(tmp_path.name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        full = None if isinstance(e, ProganError) else disk_full_cause(e)
        if full is not None and full.filename in (None, str(tmp_path)):
            raise disk_full_error(path, existed, full) from e
        raise
    finally:
        _WRITING.discard(tmp_path.name)


def disk_full_cause(exc: BaseException | None) -> OSError | None:
    """The ENOSPC / EDQUOT OSError behind `exc` (itself, or in its __cause__ / __context__ chain), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _mount_point(folder: Path) -> str:
    p = os.path.abspath(folder)
    while not os.path.ismount(p):
        p = os.path.dirname(p)
    return p


def free_space(folder: str | os.PathLike) -> str:
    """'N MB free on <mount point>' for `folder`, for disk-full messages."""
    try:
        return f"{shutil.disk_usage(folder).free / 1e6:.0f} MB free on {_mount_point(Path(folder))}"
    except OSError:
        return f"free space of {folder} unknown"


def disk_full_error(path: Path, existed: bool, err: OSError) -> ProganError:
    """`<path>: disk full while writing (N MB free on <mount>); free some space and run the same command again; ...`"""
    what = "disk quota exceeded" if err.errno == errno.EDQUOT else "disk full"
    free = free_space(path.parent)
    kept = f"the previous {path.name} is untouched" if existed else f"no partial {path.name} was left"
    return ProganError(f"{path}: {what} while writing ({free}); free some space and run the same command again; "
                       f"{kept}")


def torch_load(path: str | os.PathLike, map_location="cpu", mmap: bool = False):
    """The one way progan reads .pt files: torch.load(weights_only=True), so tensors, numbers, strings, lists
    and dicts load and a file that would import code is refused (errors.torch_load_failure reads the failure).
    torch's "Detected pickle protocol N" UserWarning (a pickle torch.save did not write, about to be refused or
    read) is not passed on to stderr: the caller reports the file in one line."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def scratch_array(folder: str | os.PathLike, prefix: str, dtype, shape: tuple[int, ...], what: str):
    """A writable np.memmap of `shape` in an unlinked temp file under `folder` (nothing is left behind, even
    after a kill), with all its blocks reserved first (posix_fallocate): a memmap that runs out of disk while
    being written dies with SIGBUS, a reservation fails at once with a one-line ProganError naming `what`."""
    import numpy as np

    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    f = tempfile.TemporaryFile(dir=folder, prefix=prefix)
    try:
        os.posix_fallocate(f.fileno(), 0, max(nbytes, 1))
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:
            f.close()
            raise ProganError(f"{folder}: disk full: {what} needs a {nbytes / 1e6:.0f} MB scratch file there "
                              f"({free_space(folder)}); free some space and run the same command again") from e
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            f.close()
            raise
        # a file system without fallocate: the memmap is used without a reservation
    return np.memmap(f, dtype, "w+", shape=shape)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (someone else's live process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Delete the temp files of `path` left by writers that were killed: their pid no longer runs, or it is this
    process's pid (reused, as in a fresh container) and this process is not writing that file."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.tmp-") + r"(\d+)-")
    for old in path.parent.glob(glob.escape(f".{path.name}.tmp-") + "*"):
        m = pattern.match(old.name)
        if not m or old.name in _WRITING:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or not pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                old.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 16 MB blocks (pyramid levels can be tens of GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()
