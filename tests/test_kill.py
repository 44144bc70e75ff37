"""Crash anywhere, run again, same result (issue #7): every stage's real `progan` process is SIGKILLed at
seeded-random moments within its normal run time, then the same command is run again to completion.

One tiny workspace per module (a zip of 400 real CelebA faces, ~3 MB, served at ~2 MB/s by an http.server on
127.0.0.1 with Range support; data.max_images 30, crop.size 8, tiny nets, MLflow off), stages in DAG order.
Not killed, only run: train --res 4 and evaluate --res 4 (the report needs them). For each stage under test:
  1. an uninterrupted run: the reference outputs and the wall time (and when the process first wrote to stderr,
     i.e. once the interpreter and its imports are up);
  2. its outputs removed, KILLS_PER_STAGE runs each SIGKILLed at start + u * (wall - start), u ~ U(0, 1);
     after each kill every output that exists must load and equal the reference (nothing half-written);
  3. the same command again: rc 0, every output loads and equals the reference (where the stage is deterministic),
     no `.*.tmp*` / `.part` files left anywhere in the workspace.
Where each kill landed (seconds, u, what was on disk) is printed: `pytest -s tests/test_kill.py`; PROGAN_KILL_SEED and
PROGAN_KILLS_PER_STAGE (default 2) vary the moments and their number.
"""
from __future__ import annotations

import csv
import fnmatch
import html.parser
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CELEBA_DIR, tiny_params, tool_env
from test_download import RangeHandler, serving, sha256
from test_resume import _assert_same_tensors, _loss_columns
from test_train import NO_MLFLOW

pytestmark = pytest.mark.xdist_group("kill")   # one worker, stages in file order

PROGAN = str(Path(sys.executable).with_name("progan"))
KILLS_PER_STAGE = int(os.environ.get("PROGAN_KILLS_PER_STAGE", "2"))   # more by hand; bench/bench_kill.py: 20
SEED = int(os.environ.get("PROGAN_KILL_SEED", "0"))
ZIP_IMAGES, MAX_IMAGES = 400, 30                # a ~3 MB zip (several of download's 1 MiB reads); 30 are used
CHUNK_BYTES, CHUNK_PAUSE_S = 65536, 0.03       # the server sends ~2 MB/s: the zip takes ~1.5 s
TRAIN_STAGES = {"4": {"batch": 8, "lr": 0.001, "transition_kimg": 0, "stabilize_kimg": 0.1},
                "8": {"batch": 8, "lr": 0.001, "transition_kimg": 0.2, "stabilize_kimg": 0.2}}   # 50 minibatches
TIMEOUT_S = 180


# ---------------------------------------------------------------- a slow server

class _ThrottledWriter:
    """Writes in CHUNK_BYTES pieces with a pause between them; a client that went away ends the response."""

    def __init__(self, raw):
        self.raw, self.gone = raw, False

    def write(self, data):
        for i in range(0, len(data), CHUNK_BYTES):
            if self.gone:
                return
            try:
                self.raw.write(data[i:i + CHUNK_BYTES])
                self.raw.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.gone = True
                return
            time.sleep(CHUNK_PAUSE_S)

    def flush(self):
        if not self.gone:
            try:
                self.raw.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.gone = True

    def __getattr__(self, name):
        return getattr(self.raw, name)


class SlowHandler(RangeHandler):
    def setup(self):
        super().setup()
        self.wfile = _ThrottledWriter(self.wfile)


@pytest.fixture(scope="module")
def slow_server():
    with serving(SlowHandler) as srv:
        yield srv


# ---------------------------------------------------------------- stages

@dataclass
class Stage:
    name: str
    argv: list[str]
    outputs: list[str]                 # declared outputs (files or folders), relative to the root
    state: list[str] = field(default_factory=list)   # more paths removed with the outputs (resume state, ...)


STAGES = [
    Stage("download", ["download"], ["data/raw/downloads/faces.zip", "data/raw/images", "data/raw/images.tsv"],
          ["data/raw"]),
    Stage("crop", ["crop"], ["data/faces"]),
    Stage("pyramid", ["pyramid"], ["data/pyramid/4.npy", "data/pyramid/8.npy", "data/pyramid/pyramid.json"]),
    Stage("train4", ["train", "--res", "4"], ["results/4/checkpoint.pt"]),
    Stage("train8", ["train", "--res", "8"], ["results/8/checkpoint.pt", "results/8/train.json",
                                              "results/8/losses.tsv", "results/8/samples.png"], ["results/8/.resume"]),
    Stage("evaluate4", ["evaluate", "--res", "4"], ["results/4/eval.json"]),
    Stage("evaluate8", ["evaluate", "--res", "8"], ["results/8/eval.json"]),
    Stage("report", ["report"], ["results/report/index.html", "results/report/swd.tsv",
                                 "results/report/losses.tsv"]),
]
BY_NAME = {s.name: s for s in STAGES}
KILLED = ["download", "crop", "pyramid", "train8", "evaluate8", "report"]
TIMINGS = ("seconds", "img_per_s", "resumed_from_kimg")      # train.json / eval.json keys that may differ


def _env() -> dict:
    env = {**tool_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": NO_MLFLOW}
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(var, None)
    return env


class Workspace:
    def __init__(self, root: Path, ref: Path):
        self.root, self.ref, self.done = root, ref, set()
        self.rng = random.Random(SEED)

    def cmd(self, stage: Stage) -> list[str]:
        return [PROGAN, *stage.argv, "--params", str(self.root / "params.yaml")]

    def run(self, stage: Stage) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(stage), env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)

    def prepare(self, name: str) -> None:
        """Run (uninterrupted) every earlier stage that has not run yet (e.g. when a single case is selected)."""
        for stage in STAGES[:[s.name for s in STAGES].index(name)]:
            if stage.name not in self.done:
                done = self.run(stage)
                assert done.returncode == 0, f"{stage.name}: {done.stderr[-2000:]}"
                self.done.add(stage.name)

    def remove_outputs(self, stage: Stage) -> None:
        for rel in [*stage.outputs, *stage.state]:
            path = self.root / rel
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


@pytest.fixture(scope="module")
def ws(tmp_path_factory, slow_server) -> Workspace:
    root = tmp_path_factory.mktemp("kill")
    faces_zip = tmp_path_factory.mktemp("kill-zip") / "faces.zip"
    with zipfile.ZipFile(faces_zip, "w", zipfile.ZIP_DEFLATED) as zf:       # as the official CelebA zip
        for f in sorted(CELEBA_DIR.glob("*.jpg"))[:ZIP_IMAGES]:
            zf.write(f, f"img_align_celeba/{f.name}")
    slow_server.files["/dl/faces.zip"] = faces_zip.read_bytes()
    tiny_params(root, size_px=8, data__source="url", data__url=f"{slow_server.url}/dl/faces.zip",
                data__sha256=sha256(faces_zip), data__max_images=MAX_IMAGES, crop__batch_images=8,
                train__stages=TRAIN_STAGES, mlflow__tracking_uri=NO_MLFLOW)
    return Workspace(root, tmp_path_factory.mktemp("kill-ref"))


# ---------------------------------------------------------------- checks

def _files(root: Path, rel: str) -> list[str]:
    """The files of an output (itself, or every file under a folder), relative to `root`."""
    path = root / rel
    if path.is_dir():
        return sorted(p.relative_to(root).as_posix() for p in path.rglob("*") if p.is_file())
    return [rel] if path.exists() else []


class _HTMLCheck(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack = []

    def handle_starttag(self, tag, attrs):
        if tag not in ("meta", "img", "br", "hr", "link", "input", "col", "source", "wbr"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
        self.stack.pop()


def load(path: Path):
    """Read a whole output the way its reader would; raises when it is truncated or malformed."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return json.loads(path.read_text())
    if suffix == ".npy":
        return np.load(path)
    if suffix == ".pt":
        return torch.load(path, weights_only=True)
    if suffix in (".png", ".jpg", ".jpeg"):
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
        return None
    if suffix in (".tsv", ".csv"):
        rows = list(csv.reader(path.open(newline=""), delimiter="\t" if suffix == ".tsv" else ","))
        assert rows and all(len(r) == len(rows[0]) for r in rows), f"{path}: ragged rows"
        return rows
    if suffix == ".html":
        parser = _HTMLCheck()
        parser.feed(path.read_text())
        parser.close()
        assert parser.stack == [], f"{path}: unclosed {parser.stack}"
        return None
    if suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            assert zf.testzip() is None
        return None
    raise AssertionError(f"no reader for {path}")


def same(rel: str, a: Path, b: Path) -> None:
    """Output `rel` of the run under test (b) equals the uninterrupted run's (a), where the stage is deterministic."""
    name = Path(rel).name
    if name == ".progan-extracted.json":               # the archive's mtime: when it was downloaded
        return
    if name in ("train.json", "eval.json"):
        ja, jb = ({k: v for k, v in json.loads(p.read_text()).items() if k not in TIMINGS} for p in (a, b))
        assert ja == jb, rel
    elif rel.startswith("results/") and name == "losses.tsv" and not rel.startswith("results/report"):
        assert _loss_columns(a) == _loss_columns(b), rel            # all but img_s and seconds
    elif name == "checkpoint.pt":
        ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        _assert_same_tensors(ca, cb, rel)
        assert a.read_bytes() == b.read_bytes(), rel               # torch.save of equal content: equal bytes
    else:
        assert a.read_bytes() == b.read_bytes(), f"{rel} differs from the uninterrupted run's"


def check_outputs(ws: Workspace, stage: Stage, complete: bool) -> list[str]:
    """Every output file that exists loads and equals the reference; with `complete`, all of them exist and
    folders hold exactly the reference's files. Returns the files found."""
    found = []
    for rel in stage.outputs:
        got, want = _files(ws.root, rel), _files(ws.ref, rel)
        if complete or got:
            assert got == want, f"{rel}: files {got[:5]}... differ from the uninterrupted run's {want[:5]}..."
        for f in got:
            load(ws.root / f)
            same(f, ws.ref / f, ws.root / f)
        found += got
    return found


def leftovers(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if fnmatch.fnmatch(p.name, ".*.tmp*") or p.name.endswith(".part"))


def _timed_run(cmd: list[str]) -> tuple[int, float, float, str]:
    """Run to the end: (rc, wall s, s until the first byte on stderr, stderr)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first, chunks = [None], []

    def read():
        while data := os.read(proc.stderr.fileno(), 65536):
            if first[0] is None:
                first[0] = time.monotonic() - t0
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    rc = proc.wait(timeout=TIMEOUT_S)
    wall_s = time.monotonic() - t0
    reader.join(timeout=10)
    proc.stderr.close()
    return rc, wall_s, first[0] if first[0] is not None else wall_s, b"".join(chunks).decode(errors="replace")


def _on_disk(ws: Workspace, stage: Stage) -> str:
    outs = [f for rel in stage.outputs for f in _files(ws.root, rel)]
    parts = [f"{len(outs)} output files"]
    snap = ws.root / "results/8/.resume/snapshot.pt"
    if stage.name == "train8" and snap.exists():
        parts.append(f"snapshot at kimg {torch.load(snap, weights_only=True)['cur_nimg'] / 1000:g}")
    part = ws.root / "data/raw/downloads/faces.zip.part"
    if part.exists():
        parts.append(f"faces.zip.part {part.stat().st_size} B")
    if temps := leftovers(ws.root):
        parts.append(f"temps {[Path(t).name[:24] for t in temps]}")
    return ", ".join(parts)


# ---------------------------------------------------------------- the test

@pytest.mark.parametrize("name", KILLED)
def test_sigkill_anywhere_then_rerun_gives_the_same_outputs(ws, name):
    ws.prepare(name)
    stage = BY_NAME[name]
    cmd = ws.cmd(stage)

    # 1. Uninterrupted: the reference outputs and the time it takes.
    ws.remove_outputs(stage)
    rc, wall_s, start_s, err = _timed_run(cmd)
    assert rc == 0, err[-2000:]
    for rel in stage.outputs:
        for f in _files(ws.root, rel):
            load(ws.root / f)
            (ws.ref / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ws.root / f, ws.ref / f)
    assert not leftovers(ws.root)
    lines = [f"{name}: uninterrupted {wall_s:.2f} s (first output at {start_s:.2f} s)"]

    # 2. Killed at random moments; whatever is on disk then is complete.
    ws.remove_outputs(stage)
    for k in range(KILLS_PER_STAGE):
        u = ws.rng.random()
        delay_s = start_s + u * (wall_s - start_s)
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        try:
            while proc.poll() is None and time.monotonic() - t0 < delay_s:
                time.sleep(0.005)
            proc.kill()                                   # SIGKILL: no handler, no cleanup
        finally:
            proc.wait(timeout=60)
        landed = "killed" if proc.returncode == -9 else f"finished first (rc {proc.returncode})"
        lines.append(f"  kill {k + 1} at {delay_s:.2f} s (u {u:.2f}): {landed}; "
                     f"{_on_disk(ws, stage)}")
        assert proc.returncode in (-9, 0)
        check_outputs(ws, stage, complete=False)

    # 3. The same command again: it completes, with the uninterrupted run's outputs and nothing left over.
    rc, rerun_s, _, err = _timed_run(cmd)
    print("\n".join(lines + [f"  rerun {rerun_s:.2f} s" + "".join(f"; {line.split(' INFO ')[-1]}" for line in
                                                               err.splitlines() if "resuming" in line)]))
    assert rc == 0, err[-2000:]
    check_outputs(ws, stage, complete=True)
    assert not leftovers(ws.root)
    assert not (ws.root / "results/8/.resume").exists()
    ws.done.add(name)


def test_the_next_write_removes_temp_files_of_killed_writers(tmp_path):
    """A SIGKILLed writer leaves `.<name>.tmp-<pid>-*` beside its output; the next write of that output removes
    it when the pid is gone (or is this process's own, reused), and keeps a live writer's and other files'."""
    from progan import fileio

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {"dead": f".eval.json.tmp-{int(dead.stdout)}-abcd1234", "reused": f".eval.json.tmp-{os.getpid()}-x1",
                 "live": f".eval.json.tmp-{live.pid}-efgh5678", "other": f".train.json.tmp-{int(dead.stdout)}-y",
                 "not_ours": ".eval.json.tmp-notapid"}
        for name in names.values():
            (tmp_path / name).write_bytes(b"half a fi")
        fileio.write_json(tmp_path / "eval.json", {"swd": 1.5})
    finally:
        live.kill()
        live.wait()
    assert json.loads((tmp_path / "eval.json").read_text()) == {"swd": 1.5}
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["eval.json", names["live"], names["other"], names["not_ours"]])
