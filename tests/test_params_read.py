"""The params each stage declares (pipeline.STAGES) are exactly the params its `run()` reads.

Every stage runs once, in DAG order, on a tiny real project (CelebA faces, crop.size 8, tiny nets) with params that
record every key read (`Params.recording`); the keys read must be the declared ones, apart from the two explicit,
commented lists below. A stage that reads an undeclared key would not re-run when that key changes, under either
front end (train read `report.grid_images` for samples.png without declaring it: issue #21); a declared key it
never reads re-runs it for nothing.
"""
from __future__ import annotations

import hashlib
import importlib
import zipfile

import pytest

from progan import params as params_mod, paths, pipeline

from helpers import CELEBA_DIR, tiny_params
from test_train import NO_MLFLOW, one_thread

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Where the Inception weights are: the file is pinned by sha256 (metrics/inception.py, a code dep of both stages), so
# every path gives the same network. Whether a file is there at all decides between numbers and none (a placeholder
# stats file, no fid/kid/is in eval.json): that is no param, and the README says what to run when the weights arrive.
_WEIGHTS_PATH = {
    "evaluate.inception_weights": "where the pinned weights file is, not what is in it",
    "evaluate.fid.cache_dir": "where the pinned weights file is fetched to",
}
# Keys a stage reads that cannot change its outputs (they change where, when or how fast, not what).
NOT_OUTPUTS = {
    "*": {
        "mlflow.tracking_uri": "where MLflow logs: a copy of the outputs, never an output",
        "mlflow.experiment": "the MLflow experiment's name",
    },
    "train": {
        "crop.size": "only to check that --res is a training resolution",
        "train.snapshot_kimg": "how often a resume snapshot is written; resuming is bit-identical (test_resume.py)",
        "train.prefetch": "how many minibatches a thread reads ahead; the same batches (test_train.py)",
        "train.data_on_device": "where the pyramid level is held; the same checkpoint (test_train.py)",
    },
    "evaluate": {
        "crop.size": "only to check that --res is a training resolution",
        "train.start_px": "only to check that --res is a training resolution",
        **_WEIGHTS_PATH,
    },
    "fid-stats": {
        "crop.size": "only to check that --res is a training resolution",
        "train.start_px": "only to check that --res is a training resolution",
        "evaluate.fid.min_res_px": "only to check that --res is one it runs at (it decides which fid-stats jobs "
                                   "there are: pipeline.DAG_SHAPE_KEYS)",
        "evaluate.fid.batch": "images per Inception forward: the same statistics whatever the batch "
                              "(test_real_stats.py)",
        **_WEIGHTS_PATH,
    },
}
# Keys a stage declares that its run() does not read itself (with the params this test runs: a folder source). Note:
# train writes the values of all its declared keys into the checkpoint ("params"), so for train this direction holds
# by construction.
DECLARED_NOT_READ: dict[str, dict[str, str]] = {
    "download": {"data.cifar10_split": "read by data.source cifar10 only (tests/test_sources.py)",
                 "data.lsun_category": "read by data.source lsun only (tests/test_sources.py)"},
}
NUM_IMAGES = 24


def _covered(key: str, by: set[str]) -> bool:
    """A key is covered by `by` when it, a section above it or (for a section) a key below it is in `by`."""
    return any(key == k or key.startswith(k + ".") or k.startswith(key + ".") or k == "" for k in by)


def _run(params_path, name: str, res: int | None = None) -> set[str]:
    params = params_mod.load(params_path).recording()
    module = importlib.import_module(pipeline.STAGES[name].module)
    module.run(params, **({"res": res} if res is not None else {}))
    return params.reads


def _check(name: str, declared: set[str], reads: set[str]) -> None:
    exempt = {**NOT_OUTPUTS["*"], **NOT_OUTPUTS.get(name, {})}
    assert "" not in reads or pipeline.WHOLE_PARAMS_YAML in declared, \
        f"{name}: reads all of params.yaml (to_dict / digest)"
    undeclared = sorted(k for k in reads if k not in exempt and not _covered(k, declared))
    assert not undeclared, f"{name}: reads {undeclared} but does not declare them (pipeline.STAGES)"
    unread = sorted(k for k in declared if k not in DECLARED_NOT_READ.get(name, {}) and not _covered(k, reads))
    assert not unread, f"{name}: declares {unread} but its run() never reads them"


def _archive(folder) -> tuple[str, str]:
    path = folder / "faces.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(CELEBA_DIR.glob("*.jpg"))[:NUM_IMAGES]:
            zf.write(f, f"faces/{f.name}")
    return path.as_uri(), hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(600)
def test_every_stage_reads_exactly_the_params_it_declares(tmp_path, monkeypatch):
    stages = {str(r): {"batch": 8, "lr": 0.001, "transition_kimg": 0 if r == 4 else 0.016, "stabilize_kimg": 0.016}
              for r in (4, 8)}
    common = dict(size_px=8, data__max_images=NUM_IMAGES, mlflow__tracking_uri=NO_MLFLOW, train__stages=stages,
                  train__tick_kimg=0.016, evaluate__num_images=16, evaluate__msssim_pairs=4, evaluate__batch=8,
                  evaluate__fid__min_res_px=8,                  # a fid-stats@8 job (offline: its placeholder)
                  report__grid_images=4, report__interpolation_steps=3)
    url, sha256 = _archive(tmp_path)
    by_url = tiny_params(tmp_path / "url", data__source="url", data__url=url, data__sha256=sha256, **common)
    path = tiny_params(tmp_path / "ws", **common)          # data.source folder: the images read in place
    params = params_mod.load(path)
    seen: dict[str, set[str]] = {}

    monkeypatch.chdir(tmp_path / "url")
    seen["download"] = _run(by_url, "download")              # the url branch reads url, sha256, md5, size limit
    monkeypatch.chdir(tmp_path / "ws")
    with one_thread():
        for job in pipeline.jobs(params):
            reads = _run(path, job.stage.name, job.res)
            if job.stage.name == "download":
                reads |= seen["download"]
            _check(job.stage.name, set(job.params), reads)
            seen[job.id] = reads
    assert (tmp_path / "ws" / paths.REPORT_HTML).is_file() and set(seen) >= {j.id for j in pipeline.jobs(params)}
    assert "fid-stats@8" in seen and (tmp_path / "ws" / paths.fid_stats(8)).is_file()
    # what this test is for: train's declaration before issue #21 (without report.grid_images) fails it
    before = set(pipeline.job(params, "train", 8).params) - {"report.grid_images"}
    with pytest.raises(AssertionError, match=r"train: reads \['report.grid_images'\] but does not declare them"):
        _check("train", before, seen["train@8"])


@pytest.mark.timeout(600)
def test_the_nogrowing_dag_runs_stage_by_stage_and_reads_what_it_declares(tmp_path, monkeypatch):
    """train.start_px = crop.size (official -nogrowing): download, crop, pyramid, train@8 from scratch, evaluate@8
    and a report of one stage, each reading exactly its declared keys (train.start_px among train's)."""
    stages = {"4": {"batch": 8, "lr": 0.001, "transition_kimg": 0, "stabilize_kimg": 0.016},     # left in, unused
              "8": {"batch": 8, "lr": 0.001, "transition_kimg": 0, "stabilize_kimg": 0.032}}
    path = tiny_params(tmp_path / "ws", size_px=8, data__max_images=NUM_IMAGES, mlflow__tracking_uri=NO_MLFLOW,
                       train__stages=stages, train__start_px=8, train__tick_kimg=0.016, evaluate__num_images=16,
                       evaluate__msssim_pairs=4, evaluate__batch=8, report__grid_images=4,
                       report__interpolation_steps=3)
    params = params_mod.load(path)
    assert [j.id for j in pipeline.jobs(params)] == ["download", "crop", "pyramid", "train@8", "evaluate@8", "report"]
    monkeypatch.chdir(tmp_path / "ws")
    with one_thread():
        for job in pipeline.jobs(params):
            reads = _run(path, job.stage.name, job.res)
            if job.stage.name != "download":                 # its url branch: the test above
                _check(job.stage.name, set(job.params), reads)
    assert (tmp_path / "ws" / paths.REPORT_HTML).is_file() and not (tmp_path / "ws" / paths.checkpoint(4)).exists()
    assert (tmp_path / "ws" / paths.pyramid_level(4)).is_file()                  # the data keeps every level
