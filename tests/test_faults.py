"""Faults of the machine (issue #7), each through the CLI: one line on stderr, exit status 1, nothing lost.

Disk full while writing a training checkpoint, a resume snapshot or a pyramid level: the error names the file, the
free space and what to do; the previous file keeps its bytes and no temp file is left. ENOSPC comes two ways:
- injected: the real writer (torch.save, the pyramid's writes) writes into a file that takes a few more bytes and
  then fails as a full disk does (OSError ENOSPC), so a partial temp file really exists when the error comes;
- a real small tmpfs filled up to a few KB (needs root with CAP_SYS_ADMIN; skipped otherwise, with the reason).
CUDA out of memory (no GPU here): a network's forward raises torch.cuda.OutOfMemoryError; the message names the
param to lower with its value. (A NaN loss is covered by test_train.py / test_resume.py.)
"""
from __future__ import annotations

import builtins
import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import CELEBA_DIR, tiny_params, write_params
from progan import cli, paths
from progan.data import mtcnn, pyramid
from progan.model import networks
from progan import checkpoint
from test_evaluate import write_checkpoint, write_reals
from test_pyramid import _faces
from test_train import NO_MLFLOW, _stage, make_project, one_thread

DISK_FULL = (r"(?P<path>\S+): disk full while writing \((?P<mb>\d+) MB free on (?P<mount>/\S*)\); free some space "
             r"and run the same command again; the previous (?P<name>\S+) is untouched")
STAGES_SNAPSHOTS = {"4": _stage(8, 0, 0.2), "8": _stage(8, 0.05, 0.05)}     # stage 4: 25 minibatches
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which 1.2 GiB is free."


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _cli(capsys, *argv) -> tuple[int, str]:
    """Run `progan ARGV`; returns (exit status, its one error line or ""), checking that no traceback was printed."""
    rc = cli.main(list(argv))
    err = re.split(r"[\r\n]+", capsys.readouterr().err)      # tqdm bars end in \r, not \n
    assert not any("Traceback" in line for line in err), err
    errors = [line for line in err if line.startswith(f"progan {argv[0]}: error:")]
    assert len(errors) == (rc != 0), err
    return rc, errors[0] if errors else ""


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if ".tmp" in p.name)


# ---------------------------------------------------------------------------------------------- injected ENOSPC

class _FillingFile:
    """A real open file that takes `room` more bytes, then fails as a full disk does (the bytes that fit are
    written first, like a write() that runs out of blocks partway)."""

    def __init__(self, f, room: int):
        self.f, self.room, self.written = f, room, 0

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        n = self.f.write(data[:max(self.room, 0)])
        self.written += n
        self.room -= n
        if len(data) > n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _disk_fills_on(monkeypatch, module, name: str, room: int, skip: int = 0) -> list:
    """`module`'s open() of the temp file of `name` (".<name>.tmp-...") returns a _FillingFile, from the
    (skip+1)-th such open on; earlier ones write normally. Returns the list of the filling files handed out."""
    handed, seen = [], [0]

    def fake_open(file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        if "w" in mode and Path(file).name.startswith(f".{name}."):      # its temp file
            seen[0] += 1
            if seen[0] > skip:
                handed.append(_FillingFile(f, room))
                return handed[-1]
        return f

    monkeypatch.setattr(module, "open", fake_open, raising=False)
    return handed


def _trained_stage_4(root: Path, monkeypatch, capsys) -> tuple[Path, Path, bytes]:
    """A tiny project in `root` (the cwd) with stage 4 trained: (params.yaml, checkpoint path, its bytes)."""
    params = make_project(root, mlflow__tracking_uri=NO_MLFLOW)
    monkeypatch.chdir(root)
    assert _cli(capsys, "train", "--res", "4", "--params", str(params))[0] == 0
    ckpt = root / paths.checkpoint(4)
    return params, ckpt, ckpt.read_bytes()


def test_disk_full_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    params, ckpt, before = _trained_stage_4(tmp_path, monkeypatch, capsys)

    filling = _disk_fills_on(monkeypatch, checkpoint, "checkpoint.pt", room=5000)
    rc, line = _cli(capsys, "train", "--res", "4", "--params", str(params))
    assert rc == 1 and len(filling) == 1 and filling[0].written == 5000      # a partial temp file was written
    m = re.fullmatch("progan train: error: " + DISK_FULL, line)
    assert m, line
    assert m["path"] == "results/4/checkpoint.pt" and m["name"] == "checkpoint.pt"
    assert int(m["mb"]) == pytest.approx(shutil.disk_usage(tmp_path).free / 1e6, abs=50)
    assert os.path.ismount(m["mount"]) and str(tmp_path).startswith(m["mount"])
    assert ckpt.read_bytes() == before and _temps(ckpt.parent) == []
    assert checkpoint.load_stage(ckpt, 4)["cur_nimg"] == 104


def test_disk_full_writing_a_snapshot_keeps_the_previous_one_and_resumes_from_it(tmp_path, monkeypatch, capsys):
    """Stage 4 of 0.2 kimg, a snapshot every 0.05 kimg: the second snapshot write fails; the first is kept and the
    same command, run again, resumes from it."""
    params = make_project(tmp_path, stages=STAGES_SNAPSHOTS, mlflow__tracking_uri=NO_MLFLOW, train__snapshot_kimg=0.05)
    monkeypatch.chdir(tmp_path)
    snap = tmp_path / paths.resume_dir(4) / checkpoint.SNAPSHOT_NAME
    first: list[bytes] = []
    real_save = checkpoint.save

    def save(path, obj):                     # record the first snapshot's bytes as they were on disk
        if Path(path).name == checkpoint.SNAPSHOT_NAME and Path(path).is_file() and not first:
            first.append(Path(path).read_bytes())
        real_save(path, obj)

    monkeypatch.setattr(checkpoint, "save", save)
    filling = _disk_fills_on(monkeypatch, checkpoint, checkpoint.SNAPSHOT_NAME, room=3000, skip=1)
    rc, line = _cli(capsys, "train", "--res", "4", "--params", str(params))
    assert rc == 1 and filling and filling[0].written == 3000, line
    m = re.fullmatch("progan train: error: " + DISK_FULL, line)
    assert m and m["path"] == "results/4/.resume/snapshot.pt" and m["name"] == "snapshot.pt", line
    assert first and snap.read_bytes() == first[0] and _temps(snap.parent) == []
    assert checkpoint.load_snapshot(snap)["cur_nimg"] == 56
    assert not (tmp_path / paths.checkpoint(4)).exists()

    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert _cli(capsys, "train", "--res", "4", "--params", str(params))[0] == 0
    info = checkpoint.load_stage(tmp_path / paths.checkpoint(4), 4)
    assert info["cur_nimg"] == 200
    assert json.loads((tmp_path / paths.train_json(4)).read_text())["resumed_from_kimg"] == 0.056


def _pyramid_project(root: Path) -> Path:
    return write_params(root, crop__size=16, pyramid__chunk_images=3, mlflow__tracking_uri=NO_MLFLOW,
                        train__stages={str(r): _stage(4, 0, 1) for r in (4, 8, 16)})


def _levels(root: Path) -> dict[int, bytes]:
    return {r: (root / paths.pyramid_level(r)).read_bytes() for r in (4, 8, 16)}


def _new_faces(root: Path, n: int, seed: int) -> np.ndarray:
    shutil.rmtree(root / paths.FACES_IMAGES_DIR, ignore_errors=True)
    return _faces(root, n, 16, seed=seed)


def test_disk_full_writing_a_pyramid_level_keeps_every_previous_level(tmp_path, monkeypatch, capsys):
    params = _pyramid_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    _new_faces(tmp_path, 7, seed=0)
    assert _cli(capsys, "pyramid", "--params", str(params))[0] == 0
    before, info = _levels(tmp_path), (tmp_path / paths.PYRAMID_INFO).read_bytes()

    _new_faces(tmp_path, 7, seed=1)                           # the new pyramid would differ from the old
    filling = _disk_fills_on(monkeypatch, pyramid, "8.npy", room=128 + 3 * 192 + 100)   # header, chunk 1, part of 2
    rc, line = _cli(capsys, "pyramid", "--params", str(params))
    assert rc == 1 and filling[0].written == 128 + 3 * 192 + 100
    m = re.fullmatch("progan pyramid: error: " + DISK_FULL, line)
    assert m and m["path"] == "data/pyramid/8.npy" and m["name"] == "8.npy", line
    assert _levels(tmp_path) == before and (tmp_path / paths.PYRAMID_INFO).read_bytes() == info
    assert _temps(tmp_path / paths.PYRAMID_DIR) == []


# ---------------------------------------------------------------------------------------------- real tmpfs

@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MB tmpfs at tmp_path/disk (unmounted afterwards); skipped where mounting is not allowed."""
    where = tmp_path / "disk"
    where.mkdir()
    cwd = os.getcwd()                  # restored before unmounting: later tests in this process need their cwd
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a real tmpfs needs root with CAP_SYS_ADMIN (mount -t tmpfs); the injected variants ran")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); the injected variants ran")
    try:
        yield where
    finally:
        os.chdir(cwd)
        subprocess.run(["umount", "-l", str(where)], check=True)


def _fill(disk: Path, leave_bytes: int) -> Path:
    """Write a filler file so that about `leave_bytes` stay free on `disk`."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as f:
        f.write(b"\0" * (free - leave_bytes))
    assert abs(shutil.disk_usage(disk).free - leave_bytes) <= 8192
    return filler


def test_real_full_tmpfs_checkpoint(tmpfs, monkeypatch, capsys):
    params, ckpt, before = _trained_stage_4(tmpfs, monkeypatch, capsys)
    leave = 24 * 1024                           # room for losses.tsv, samples.png, train.json; not the checkpoint
    assert len(before) > 2 * leave
    filler = _fill(tmpfs, leave)
    rc, line = _cli(capsys, "train", "--res", "4", "--params", str(params))
    m = re.fullmatch("progan train: error: " + DISK_FULL, line)
    assert rc == 1 and m and m["path"] == "results/4/checkpoint.pt" and m["mount"] == str(tmpfs), line
    assert int(m["mb"]) == 0 and ckpt.read_bytes() == before and _temps(ckpt.parent) == []
    filler.unlink()                                           # free some space, run the same command again
    assert _cli(capsys, "train", "--res", "4", "--params", str(params))[0] == 0
    assert ckpt.read_bytes() == before                        # deterministic CPU run: the same checkpoint


def test_real_full_tmpfs_pyramid(tmpfs, monkeypatch, capsys):
    params = _pyramid_project(tmpfs)
    monkeypatch.chdir(tmpfs)
    _new_faces(tmpfs, 64, seed=0)
    assert _cli(capsys, "pyramid", "--params", str(params))[0] == 0
    before = _levels(tmpfs)
    new = _new_faces(tmpfs, 64, seed=1)
    filler = _fill(tmpfs, 16 * 1024)                          # 16.npy alone is 49 KB
    rc, line = _cli(capsys, "pyramid", "--params", str(params))
    m = re.fullmatch("progan pyramid: error: " + DISK_FULL, line)
    assert rc == 1 and m and re.fullmatch(r"data/pyramid/(4|8|16)\.npy", m["path"]), line
    assert _levels(tmpfs) == before and _temps(tmpfs / paths.PYRAMID_DIR) == []
    filler.unlink()
    assert _cli(capsys, "pyramid", "--params", str(params))[0] == 0
    np.testing.assert_array_equal(np.load(tmpfs / paths.pyramid_level(16)), new)


def test_real_full_tmpfs_scratch_file_is_refused_before_writing(tmpfs):
    """SWD (and evaluate's generated images) spill to a memmapped scratch file; on a full disk a memmap write
    is SIGBUS, which would kill the process. The whole file is reserved first, so it is one clear error."""
    from progan.errors import ProganError
    from progan.metrics import swd

    images = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    opts = dict(descriptors_per_image=64, directions=4, repeats=1, device="cpu", spill_dir=tmpfs, ram_bytes=0)
    filler = _fill(tmpfs, 64 * 1024)                     # one set's descriptors: 20 x 64 x 147 x 4 = 753 KB
    with pytest.raises(ProganError, match=rf"^{tmpfs}: disk full: SWD descriptors needs a 1 MB scratch file there "
                                          rf"\(0 MB free on {tmpfs}\); free some space and run the same command again$"):
        swd.swd(images, images[::-1].copy(), **opts)
    assert sorted(p.name for p in tmpfs.iterdir()) == ["filler"]
    filler.unlink()
    assert swd.swd(images, images[::-1].copy(), **opts)["swd_16"] > 0


def test_scratch_file_where_fallocate_is_unsupported_still_works(tmp_path, monkeypatch):
    """File systems without fallocate (EOPNOTSUPP) get the memmap without a reservation."""
    from progan import fileio

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    arr = fileio.scratch_array(tmp_path, ".x-", np.float32, (3, 5), "a test array")
    arr[:] = 7
    assert arr.shape == (3, 5) and float(arr.sum()) == 105 and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- CUDA out of memory

def _raise_oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError(OOM)


def test_out_of_memory_in_training_names_the_batch_and_the_snapshot(tmp_path, monkeypatch, capsys):
    """G's forward runs out of memory in the 8th minibatch (stage kimg 0.056), right after the first snapshot."""
    params = make_project(tmp_path, stages=STAGES_SNAPSHOTS, mlflow__tracking_uri=NO_MLFLOW, train__snapshot_kimg=0.05)
    monkeypatch.chdir(tmp_path)
    real_forward, calls = networks.Generator.forward, [0]

    def forward(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] > 7 * 2:                  # G runs twice per minibatch (for D's step, then its own)
            _raise_oom()
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(networks.Generator, "forward", forward)
    rc, line = _cli(capsys, "train", "--res", "4", "--params", str(params))
    assert rc == 1
    assert line == ("progan train: error: train 4 px at stage kimg 0.056 (stabilize): CUDA out of memory (Tried to "
                    "allocate 2.00 GiB); lower train.stages.4.batch (now 8) in params.yaml and run `progan train "
                    "--res 4` again; the snapshot results/4/.resume/snapshot.pt (stage kimg 0.056) is kept, but it "
                    "resumes only with batch 8: with a lower batch the stage restarts from scratch"), line


def test_out_of_memory_in_the_first_step_of_stage_8(tmp_path, monkeypatch, capsys):
    params, _, before = _trained_stage_4(tmp_path, monkeypatch, capsys)
    monkeypatch.setattr(networks.Generator, "forward", _raise_oom)
    rc, line = _cli(capsys, "train", "--res", "8", "--params", str(params))
    assert rc == 1 and line == (
        "progan train: error: train 8 px at stage kimg 0.000 (transition): CUDA out of memory (Tried to allocate "
        "2.00 GiB); lower train.stages.8.batch (now 8) in params.yaml and run `progan train --res 8` again; no "
        "snapshot yet; the stage restarts from results/4/checkpoint.pt, which is untouched"), line
    assert (tmp_path / paths.checkpoint(4)).read_bytes() == before


def test_out_of_memory_in_evaluate_names_evaluate_batch(tmp_path, monkeypatch, capsys):
    params = tiny_params(tmp_path, size_px=16, mlflow__tracking_uri=NO_MLFLOW)     # evaluate.batch 32
    write_reals(tmp_path, 40)
    write_checkpoint(tmp_path)
    old = tmp_path / paths.eval_json(16)
    old.write_text('{"old": true}\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(networks.Generator, "forward", _raise_oom)
    rc, line = _cli(capsys, "evaluate", "--res", "16", "--params", str(params))
    assert rc == 1 and line == (
        "progan evaluate: error: evaluate 16 px: CUDA out of memory (Tried to allocate 2.00 GiB); lower "
        "evaluate.batch (now 32) in params.yaml and run `progan evaluate --res 16` again; results/16/checkpoint.pt "
        "and any previous results/16/eval.json are untouched"), line
    assert old.read_text() == '{"old": true}\n'


def _crop_project(root: Path, monkeypatch, **overrides) -> tuple[Path, Path]:
    """A 32 px project in `root` (the cwd) listing two real CelebA images, with a previous data/faces manifest:
    (params.yaml, that manifest)."""
    params = write_params(root, crop__size=32, mlflow__tracking_uri=NO_MLFLOW,
                          train__stages={str(r): _stage(4, 0, 1) for r in (4, 8, 16, 32)}, **overrides)
    tsv = root / paths.IMAGES_LIST
    tsv.parent.mkdir(parents=True)
    tsv.write_text("path\tbytes\n" + "".join(f"{f}\t0\n" for f in sorted(CELEBA_DIR.glob("*.jpg"))[:2]))
    previous = root / paths.FACES_MANIFEST
    previous.parent.mkdir(parents=True)
    previous.write_text("previous crops\n")
    monkeypatch.chdir(root)
    return params, previous


def test_out_of_memory_in_crop_names_crop_batch_images(tmp_path, monkeypatch, capsys):
    params, previous = _crop_project(tmp_path, monkeypatch, crop__batch_images=2)
    monkeypatch.setattr(mtcnn.RNet, "forward", _raise_oom)
    rc, line = _cli(capsys, "crop", "--params", str(params))
    assert rc == 1 and line == (
        "progan crop: error: crop: CUDA out of memory (Tried to allocate 2.00 GiB); lower crop.batch_images (now 2) "
        "in params.yaml and run `progan crop` again; data/faces is untouched (the crops start over)"), line
    assert previous.read_text() == "previous crops\n"
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".faces")]


def test_disk_full_writing_crops_is_one_line_and_keeps_the_previous_faces(tmp_path, monkeypatch, capsys):
    """Crops are written into a temp folder with plain writes (not atomic_path): the CLI still names the disk."""
    params, previous = _crop_project(tmp_path, monkeypatch, crop__detector="center")
    real_write_bytes = Path.write_bytes

    def full(self, data):
        real_write_bytes(self, data[:100])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    rc, line = _cli(capsys, "crop", "--params", str(params))
    assert rc == 1 and line.startswith("progan crop: error: disk full (") and line.endswith(
        "); free some space and run the same command again (finished outputs are untouched)"), line
    assert previous.read_text() == "previous crops\n"
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".faces")]
