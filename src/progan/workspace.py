"""Never run Snakemake and DVC on the same workspace at once: the second one refuses with a message.

Both tools keep their own locks, but neither knows the other's:
- Snakemake writes `.snakemake/locks/*.lock` for the whole run. Its jobs carry PROGAN_DRIVER=snakemake
  (set in the Snakefile's onstart), so a `progan` stage command without it (from `dvc repro`, or by hand)
  refuses while those locks exist.
- DVC records the process running a stage in `.dvc/tmp/rwlock` (JSON with pids) and holds `.dvc/tmp/lock`
  between stages; Snakemake's onstart refuses while either shows a live `dvc` process.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from progan.errors import ProganError
from progan.fileio import pid_alive

DRIVER_ENV = "PROGAN_DRIVER"


def running_dvc(root: Path) -> int | None:
    """pid of a `dvc` process working on this workspace, else None."""
    tmp = root / ".dvc" / "tmp"
    try:
        info = json.loads((tmp / "rwlock").read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    for mode in ("write", "read"):
        for entries in info.get(mode, {}).values():
            for entry in entries if isinstance(entries, list) else [entries]:
                pid = int(entry.get("pid", 0))
                if pid and pid != os.getpid() and pid_alive(pid):
                    return pid
    lock = tmp / "lock"
    if lock.exists():
        with open(lock, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return -1
            fcntl.flock(f, fcntl.LOCK_UN)
    return None


def snakemake_locked(root: Path) -> bool:
    locks = root / ".snakemake" / "locks"
    return locks.is_dir() and any(locks.iterdir())


def check_for_snakemake(root: Path) -> None:
    """Called by the Snakefile's onstart: refuse while DVC works on this workspace."""
    pid = running_dvc(root)
    if pid is not None:
        who = f"pid {pid}" if pid > 0 else "it holds .dvc/tmp/lock"
        raise ProganError(f"DVC is running on this workspace ({who}); wait for it to finish. "
                          f"Never run Snakemake and DVC on the same workspace at the same time")


def check_for_stage(root: Path) -> None:
    """Called by every `progan` stage command not launched by our Snakemake: refuse while Snakemake runs here."""
    if os.environ.get(DRIVER_ENV) == "snakemake":
        return
    if snakemake_locked(root):
        raise ProganError(f"Snakemake is running on this workspace ({root / '.snakemake/locks'} exists); wait for "
                          f"it, or if it crashed run `snakemake --unlock`. Never run Snakemake and DVC at once")
