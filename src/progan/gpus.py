"""Which GPUs a job gets: how many it asks for, and a lease on concrete devices while it runs.

Two sides, one rule each:
- **What a job asks for** (`requested`): a pure function of params.yaml and the Snakemake budget
  (`--resources gpu=N`). The Snakefile declares it as the rule's `gpu` resource, and a job run by hand or by
  DVC computes the same number. Under a cluster executor the devices of the submit host (a login node,
  usually without GPUs) never enter it: `train.gpus: auto` asks for 1 GPU per job there.
- **What a job gets** (`job_lease`, called once per process, by `progan.cli` only): the devices it can see
  (CUDA_VISIBLE_DEVICES, else nvidia-smi), leased exclusively, and handed to the stage. Snakemake only *counts*
  the `gpu` resource; it never says which device a job should use, so on one machine every GPU job locks
  `<lock dir>/<device>.lock` with `fcntl.flock` for each device it uses (all-or-nothing when it needs more than
  one, held for the job's lifetime, dying with the process, SIGKILL too) and sets CUDA_VISIBLE_DEVICES to them
  before CUDA starts. Inside a SLURM allocation with GPUs the scheduler has already made the devices exclusive,
  so nothing is locked (lock files on a node would collide across jobs whose devices SLURM renumbers from 0).
  A job that sees fewer devices than it asked for says so in one line and runs on what it has.

The lock dir is machine-wide (GPUs belong to the machine, not to a workspace): PROGAN_GPU_LOCK_DIR, else
`<tmp>/progan-gpu-locks`. Each lock file holds the pid and command of its holder, so a job that waits
names who it is waiting for, once a minute.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from progan import pipeline
from progan.errors import ProganError
from progan.log import log

BUDGET_ENV = "PROGAN_GPU_BUDGET"       # set by the Snakefile from `--resources gpu=N`; absent = no limit
REQUEST_ENV = "PROGAN_GPUS_REQUESTED"  # set by each Snakemake rule to its `gpu` resource (what it asked for)
LOCK_DIR_ENV = "PROGAN_GPU_LOCK_DIR"
CLUSTER_GPUS_PER_JOB = 1               # `train.gpus: auto` under a cluster executor (documented in the README)
WAIT_LOG_S = 60.0                      # a waiting job logs who holds its devices this often
GPU_COMMANDS = pipeline.gpu_stages()   # the stages that declare GPU use (pipeline.STAGES: crop, train, evaluate)

_held: "Lease | None" = None           # this process's lease: one per process, by construction


@dataclasses.dataclass(frozen=True)
class Lease:
    devices: tuple[str, ...]           # device ids as CUDA_VISIBLE_DEVICES names them (empty = CPU)
    requested: int                     # what the job asked for

    @property
    def count(self) -> int:
        return len(self.devices)


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


def resolve(wanted, budget: int | None, num_visible: int | None, key: str = "train.gpus") -> int:
    """GPUs a training job asks for. `wanted` is 'auto' or an int from params; budget is `--resources gpu`
    (None = unlimited); num_visible is the devices of the machine the job runs on, or None when that machine
    is not this one (a cluster executor).

    auto = every GPU the job can get: min(budget, visible devices) on this machine, CLUSTER_GPUS_PER_JOB on a
    cluster. An explicit count larger than the budget is an error naming the param, so the run fails at once
    instead of waiting forever; the visible devices never make it fail (the job says what it got).
    """
    if wanted == "auto":
        count = CLUSTER_GPUS_PER_JOB if num_visible is None else num_visible
        return count if budget is None else min(budget, count)
    wanted = int(wanted)
    if budget is not None and wanted > budget:
        raise ProganError(f"params.yaml: {key} is {wanted} but snakemake --resources gpu={budget}; "
                          f"lower {key} or raise --resources gpu")
    return wanted


def requested(command: str, params, budget: int | None, num_visible: int | None) -> int:
    """GPUs a job of `command` asks for (see `resolve`), from its stage's declared GPU use (pipeline.Stage.gpu):
    a params key (train: `train.gpus`) says how many; "one" (crop, evaluate) is one GPU when there is one;
    `train.gpus: 0` makes the whole pipeline a CPU one."""
    stage = pipeline.STAGES.get(command)
    use = stage.gpu if stage is not None else None
    if use is None:
        return 0
    if use != "one":                                   # a params key, e.g. train.gpus
        wanted = params
        for part in use.split("."):
            wanted = getattr(wanted, part)
        return resolve(wanted, budget, num_visible, key=use)
    if params.train.gpus == 0:
        return 0
    return min(1, resolve("auto", budget, num_visible))


def _request_from_env() -> int | None:
    value = os.environ.get(REQUEST_ENV)
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        raise ProganError(f"{REQUEST_ENV}={value!r} is not an integer (set by the Snakemake rule)") from None


def _slurm_gpus() -> bool:
    """True inside a SLURM job step that was allocated GPUs (the scheduler made them exclusive)."""
    return "SLURM_JOB_ID" in os.environ and any(
        os.environ.get(k) for k in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE"))


def default_lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "progan-gpu-locks")


def _open_lock_dir(folder: Path) -> Path:
    """Create the machine-wide lock dir, writable by every user (sticky, like /tmp)."""
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            folder.chmod(0o1777)
    return folder


def _try_lock(folder: Path, device: str):
    """The locked file object of one device, or None while another process holds it."""
    path = folder / f"{device}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666)                       # other users' jobs must be able to lock it too
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\t{socket.gethostname()}\tprogan {' '.join(sys.argv[1:])[:200]}\n")
    f.flush()
    return f


def holders(folder: Path, devices: list[str]) -> dict[str, str]:
    """device -> 'pid N on HOST (command)' of the process holding its lock, for devices that are held."""
    out = {}
    for dev in devices:
        path = folder / f"{dev}.lock"
        if not path.exists():
            continue
        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                continue                                # free
            except BlockingIOError:
                pass
            pid, host, command = (f.read().strip().split("\t") + ["", "", ""])[:3]
        out[dev] = f"pid {pid or '?'}" + (f" on {host}" if host else "") + (f" ({command})" if command else "")
    return out


@contextlib.contextmanager
def lease(count: int, devices: list[str] | None = None, lock_dir: str | Path | None = None,
          poll_s: float = 0.5, timeout_s: float | None = None) -> Iterator[list[str]]:
    """Hold `count` of `devices` exclusively; set CUDA_VISIBLE_DEVICES to them while held.

    count 0 means CPU: nothing is locked and CUDA_VISIBLE_DEVICES is set empty so CUDA stays off.
    A second lease in the same process is refused at once (it would wait forever on its own locks).
    """
    global _held
    if _held is not None:
        raise ProganError(f"this process already holds a GPU lease ({','.join(_held.devices) or 'CPU'}); "
                          f"a job takes one lease, in progan.cli (this is a bug: please report it)")
    devices = visible_devices() if devices is None else list(devices)
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    held: list = []
    _held = Lease((), count)                    # reserved: a nested call fails instead of waiting
    try:
        if count <= 0:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
            yield []
            return
        if count > len(devices):
            raise ProganError(f"a job needs {count} GPU(s) but only {len(devices)} are visible "
                              f"({','.join(devices) or 'none'}); lower the gpus param")
        folder = _open_lock_dir(Path(lock_dir) if lock_dir is not None else default_lock_dir())
        start = last_log = time.monotonic()
        waited = False
        while True:
            for dev in devices:
                f = _try_lock(folder, dev)
                if f is not None:
                    held.append((dev, f))
                    if len(held) == count:
                        break
            if len(held) == count:
                break
            for _, f in held:  # all-or-nothing: never sit on part of a multi-GPU request
                f.close()
            held = []
            now = time.monotonic()
            if timeout_s is not None and now - start > timeout_s:
                raise ProganError(f"no {count} free GPU(s) among {','.join(devices)} after {timeout_s:.0f} s")
            if not waited or now - last_log >= WAIT_LOG_S:
                who = "; ".join(f"{d} held by {h}" for d, h in holders(folder, devices).items()) or "none held"
                log.info("waiting for %d free GPU(s) among %s%s: %s (locks in %s)", count, ",".join(devices),
                         f" for {now - start:.0f} s" if waited else "", who, folder)
                waited, last_log = True, now
            time.sleep(poll_s)
        leased = [dev for dev, _ in held]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(leased)
        log.info("GPU lease: CUDA_VISIBLE_DEVICES=%s", os.environ["CUDA_VISIBLE_DEVICES"])
        _held = Lease(tuple(leased), count)
        yield leased
    finally:
        _held = None
        for _, f in held:
            f.close()
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous


@contextlib.contextmanager
def job_lease(command: str, params) -> Iterator[Lease]:
    """The one lease of a `progan` GPU command: decide the count, take the devices, hand them over.

    The count is what the Snakemake rule asked for (PROGAN_GPUS_REQUESTED), else `requested()` for this
    machine (DVC, by hand). Fewer visible devices than requested: one line, and the job runs on what it has.
    A torchrun worker inherits its launcher's lease (nothing is locked again); a SLURM step that was allocated
    GPUs uses them as the scheduler gave them.
    """
    visible = visible_devices()
    if "LOCAL_RANK" in os.environ:                                  # torchrun worker: the launcher leased
        with _holding(visible, len(visible)) as held:
            yield held
        return
    asked = _request_from_env()
    if asked is None:
        asked = requested(command, params, budget_from_env(), len(visible))
    count = min(asked, len(visible))
    if count < asked:
        log.warning("%s: asked for %d GPU(s) but this job sees %d (CUDA_VISIBLE_DEVICES=%s); running on %s",
                    command, asked, len(visible), os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
                    f"{count} GPU(s)" if count else "the CPU")
    if count > 0 and _slurm_gpus():
        log.info("GPU lease: devices %s allocated by SLURM job %s", ",".join(visible[:count]),
                 os.environ["SLURM_JOB_ID"])
        with _holding(visible[:count], asked) as held:
            yield held
        return
    with lease(count, visible) as devices:
        yield Lease(tuple(devices), asked)


@contextlib.contextmanager
def _holding(devices: list[str], asked: int) -> Iterator[Lease]:
    """Record devices given by someone else (torchrun's launcher, SLURM) as this process's lease."""
    global _held
    if _held is not None:
        raise ProganError("this process already holds a GPU lease; a job takes one lease, in progan.cli")
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    _held = Lease(tuple(devices), asked)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    try:
        yield _held
    finally:
        _held = None
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous


def current() -> Lease | None:
    """The lease this process holds (None outside `progan` GPU commands, e.g. in tests calling run())."""
    return _held


@contextlib.contextmanager
def fp32_convolutions(device) -> Iterator[None]:
    """On a CUDA `device`, cuDNN convolutions in full fp32 for the block (no TF32: its 10-bit mantissa products move
    a network's outputs by ~1e-3 relative), the previous setting restored after. Only `allow_tf32` is touched
    (`torch.backends.cudnn.flags()` would also reset `benchmark` and `deterministic` to its own defaults). For the
    networks whose numbers must match a reference (MTCNN, Inception); on other devices it does nothing."""
    import torch

    if torch.device(device).type != "cuda":
        yield
        return
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before
