"""Which GPUs a job gets: a count from params + the scheduler's budget, and a lease on concrete devices.

Snakemake only *counts* the `gpu` resource (`snakemake --resources gpu=8`); it never says which
device a job should use. So every GPU job takes a lease: an exclusive `fcntl.flock` on
`.progan/gpu-locks/<device>.lock` for each device it uses, all-or-nothing when it needs more than
one, held for the job's lifetime, and sets CUDA_VISIBLE_DEVICES to the leased devices before CUDA
starts. Two concurrent jobs therefore never share a device. Locks die with the process (SIGKILL too).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

from progan import paths
from progan.errors import ProganError
from progan.log import log

BUDGET_ENV = "PROGAN_GPU_BUDGET"   # set by the Snakefile from `--resources gpu=N`; absent = no limit


def visible_devices() -> list[str]:
    """Device ids this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists, else none."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def budget_from_env() -> int | None:
    value = os.environ.get(BUDGET_ENV)
    return int(value) if value not in (None, "") else None


def resolve(wanted, budget: int | None, num_visible: int, key: str = "train.gpus") -> int:
    """GPUs a job uses. `wanted` is 'auto' or an int from params; budget is `--resources gpu` (None = unlimited).

    auto = every GPU the job can get: min(budget, visible devices). An explicit count larger than the
    budget is an error naming the param, so the job fails at once instead of waiting forever.
    """
    if wanted == "auto":
        return num_visible if budget is None else min(budget, num_visible)
    wanted = int(wanted)
    if budget is not None and wanted > budget:
        raise ProganError(f"params.yaml: {key} is {wanted} but snakemake --resources gpu={budget}; "
                          f"lower {key} or raise --resources gpu")
    if wanted > num_visible:
        raise ProganError(f"params.yaml: {key} is {wanted} but only {num_visible} GPU(s) are visible; "
                          f"lower {key} (or set it to auto)")
    return wanted


def _try_lock(lock_dir: Path, device: str):
    f = open(lock_dir / f"{device}.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


@contextlib.contextmanager
def lease(count: int, devices: list[str] | None = None, lock_dir: str | Path | None = None,
          poll_s: float = 0.5, timeout_s: float | None = None) -> Iterator[list[str]]:
    """Hold `count` of `devices` exclusively; set CUDA_VISIBLE_DEVICES to them while held.

    count 0 means CPU: nothing is locked and CUDA_VISIBLE_DEVICES is set empty so CUDA stays off.
    """
    devices = visible_devices() if devices is None else list(devices)
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    held: list = []
    try:
        if count <= 0:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
            yield []
            return
        if count > len(devices):
            raise ProganError(f"a job needs {count} GPU(s) but only {len(devices)} are visible "
                              f"({','.join(devices) or 'none'}); lower the gpus param")
        lock_dir = Path(lock_dir or Path(paths.STATE_DIR) / "gpu-locks")
        lock_dir.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        waited = False
        while True:
            for dev in devices:
                f = _try_lock(lock_dir, dev)
                if f is not None:
                    held.append((dev, f))
                    if len(held) == count:
                        break
            if len(held) == count:
                break
            for _, f in held:  # all-or-nothing: never sit on part of a multi-GPU request
                f.close()
            held = []
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise ProganError(f"no {count} free GPU(s) among {','.join(devices)} after {timeout_s:.0f} s")
            if not waited:
                log.info("waiting for %d free GPU(s) among %s", count, ",".join(devices))
                waited = True
            time.sleep(poll_s)
        leased = [dev for dev, _ in held]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(leased)
        log.info("GPU lease: CUDA_VISIBLE_DEVICES=%s", os.environ["CUDA_VISIBLE_DEVICES"])
        yield leased
    finally:
        for _, f in held:
            f.close()
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous
