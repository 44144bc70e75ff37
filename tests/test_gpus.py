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
    # The devices of the machine never make a request fail: the job says what it got (issue #20).
    assert gpus.resolve(2, None, 1) == 2 and gpus.resolve(4, 8, 0) == 4
    # Jobs that run elsewhere (cluster executor: num_visible None): auto asks for one GPU per job.
    assert gpus.resolve("auto", None, None) == gpus.CLUSTER_GPUS_PER_JOB == 1
    assert gpus.resolve("auto", 8, None) == 1 and gpus.resolve("auto", 0, None) == 0
    assert gpus.resolve(4, 8, None) == 4


class _P:
    def __init__(self, gpus_value):
        self.train = type("T", (), {"gpus": gpus_value})()


def test_requested_per_command():
    assert gpus.requested("crop", _P("auto"), None, 2) == 1
    assert gpus.requested("evaluate", _P(4), 8, None) == 1            # cluster: one GPU per evaluation
    assert gpus.requested("evaluate", _P("auto"), 0, None) == 0        # --resources gpu=0
    assert gpus.requested("crop", _P(0), None, 4) == 0                 # train.gpus 0: a CPU pipeline
    assert gpus.requested("train", _P("auto"), None, 3) == 3
    assert gpus.requested("train", _P("auto"), None, None) == 1
    assert gpus.requested("report", _P("auto"), None, 3) == 0


def test_visible_devices_from_env(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert gpus.visible_devices() == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpus.visible_devices() == []


def test_lease_sets_env_and_restores(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with gpus.lease(2, ["0", "1", "2", "3"], lock_dir=tmp_path) as held:
        assert held == ["0", "1"] and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
        assert gpus.current().devices == ("0", "1")
        assert (tmp_path / "0.lock").read_text().split("\t")[0] == str(os.getpid())   # who holds it
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3" and gpus.current() is None
    with gpus.lease(0, ["0"], lock_dir=tmp_path) as held:
        assert held == [] and os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_a_second_lease_in_one_process_fails_at_once(tmp_path):
    """Issue #20: `progan train` leased its devices twice and waited forever on its own lock."""
    start = time.monotonic()
    with gpus.lease(1, ["0"], lock_dir=tmp_path):
        for count in (1, 0):
            with pytest.raises(ProganError, match="already holds a GPU lease"):
                with gpus.lease(count, ["0", "1"], lock_dir=tmp_path):
                    pass
    assert time.monotonic() - start < 5
    with gpus.lease(1, ["0"], lock_dir=tmp_path, timeout_s=5) as held:    # released on exit
        assert held == ["0"]


def test_no_free_devices_times_out_and_names_the_holder(tmp_path, caplog):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_job, args=(tmp_path, ["0", "1"], 2, 60, queue))
    p.start()
    try:
        queue.get(timeout=30)
        with caplog.at_level("INFO", logger="progan"):
            with pytest.raises(ProganError, match="no 1 free GPU"):
                with gpus.lease(1, ["0", "1"], lock_dir=tmp_path, timeout_s=0.3, poll_s=0.05):
                    pass
        assert f"0 held by pid {p.pid}" in caplog.text and f"1 held by pid {p.pid}" in caplog.text
    finally:
        p.kill()
        p.join()


def test_job_lease_takes_what_the_rule_asked_for(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(gpus.LOCK_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    monkeypatch.setenv(gpus.REQUEST_ENV, "2")
    with gpus.job_lease("train", _P("auto")) as held:
        assert held.devices == ("0", "1") and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    monkeypatch.delenv(gpus.REQUEST_ENV)                    # by hand / DVC: auto = every visible device
    with gpus.job_lease("train", _P("auto")) as held:
        assert held.devices == ("0", "1", "2")
    with gpus.job_lease("evaluate", _P("auto")) as held:
        assert held.devices == ("0",)
    monkeypatch.setenv(gpus.REQUEST_ENV, "4")              # the scheduler gave fewer: one line, run on those
    with caplog.at_level("WARNING", logger="progan"), gpus.job_lease("train", _P(4)) as held:
        assert held.count == 3 and held.requested == 4
    assert "train: asked for 4 GPU(s) but this job sees 3 (CUDA_VISIBLE_DEVICES=0,1,2); running on 3 GPU(s)" \
        in caplog.text
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with gpus.job_lease("train", _P(4)) as held:
        assert held.count == 0 and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert "running on the CPU" in caplog.text


def test_job_lease_trusts_slurm_and_torchrun(tmp_path, monkeypatch):
    """Inside a SLURM allocation the scheduler made the devices exclusive, and they are numbered from 0 on every
    node: nothing is locked. A torchrun worker inherits the launcher's lease."""
    lock_dir = tmp_path / "locks"
    monkeypatch.setenv(gpus.LOCK_DIR_ENV, str(lock_dir))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_JOB_GPUS", "3")
    with gpus.lease(1, ["0"], lock_dir=lock_dir):          # e.g. another SLURM job's lock on this node
        pass
    with gpus.job_lease("train", _P(1)) as held:
        assert held.devices == ("0",)
    for key in ("SLURM_JOB_ID", "SLURM_JOB_GPUS"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_job, args=(lock_dir, ["0", "1"], 2, 60, queue))   # the launcher holds both
    p.start()
    try:
        queue.get(timeout=30)
        with gpus.job_lease("train", _P(2)) as held:
            assert held.devices == ("0", "1")
    finally:
        p.kill()
        p.join()


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
