"""GPU counts and device leases, on the CPU with fake device lists."""
import multiprocessing as mp
import os
import time

import pytest

from progan import gpus
from progan.errors import ProganError


def test_resolve_auto_and_explicit():
    assert gpus.resolve("auto", None, 4) == 4
    assert gpus.resolve("auto", 8, 4) == 4
    assert gpus.resolve("auto", 2, 4) == 2
    assert gpus.resolve("auto", None, 0) == 0
    assert gpus.resolve(2, 8, 4) == 2
    with pytest.raises(ProganError, match=r"train.gpus is 16 but snakemake --resources gpu=8; lower train.gpus"):
        gpus.resolve(16, 8, 16)
    with pytest.raises(ProganError, match="only 1 GPU"):
        gpus.resolve(2, None, 1)


def test_visible_devices_from_env(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert gpus.visible_devices() == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpus.visible_devices() == []


def test_lease_sets_env_and_restores(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with gpus.lease(2, ["0", "1", "2", "3"], lock_dir=tmp_path) as held:
        assert held == ["0", "1"] and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
        with gpus.lease(2, ["0", "1", "2", "3"], lock_dir=tmp_path) as other:  # another job, same machine
            assert other == ["2", "3"]
        with pytest.raises(ProganError, match="no 3 free GPU"):
            with gpus.lease(3, ["0", "1", "2", "3"], lock_dir=tmp_path, timeout_s=0.3):
                pass
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    with gpus.lease(0, ["0"], lock_dir=tmp_path) as held:
        assert held == [] and os.environ["CUDA_VISIBLE_DEVICES"] == ""


def _job(lock_dir, devices, count, hold_s, queue):
    with gpus.lease(count, devices, lock_dir=lock_dir, poll_s=0.02) as held:
        queue.put((os.getpid(), "start", tuple(held), time.monotonic()))
        time.sleep(hold_s)
        queue.put((os.getpid(), "end", tuple(held), time.monotonic()))


def test_concurrent_jobs_never_share_a_device(tmp_path):
    """Six processes (1 and 2 GPU jobs) over 3 fake devices: at no moment is a device held twice."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    devices = ["0", "1", "2"]
    procs = [ctx.Process(target=_job, args=(tmp_path, devices, count, 0.2, queue)) for count in (2, 1, 2, 1, 1, 2)]
    for p in procs:
        p.start()
    events = [queue.get(timeout=60) for _ in range(2 * len(procs))]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    events.sort(key=lambda e: e[3])
    in_use: dict[str, int] = {}
    for pid, kind, held, _ in events:
        for dev in held:
            if kind == "start":
                assert dev not in in_use, f"device {dev} leased twice"
                in_use[dev] = pid
            else:
                del in_use[dev]
    assert len({e[2] for e in events if len(e[2]) == 2}) >= 1


def test_lease_released_when_process_is_killed(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_job, args=(tmp_path, ["0"], 1, 60, queue))
    p.start()
    queue.get(timeout=30)
    p.kill()
    p.join()
    with gpus.lease(1, ["0"], lock_dir=tmp_path, timeout_s=5) as held:
        assert held == ["0"]
