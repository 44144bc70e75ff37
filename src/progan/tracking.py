"""MLflow tracking: one parent run per pipeline invocation, one child run per stage.

The only module that imports mlflow, and only lazily, inside the functions that log: importing
progan.tracking costs nothing, and a stage never needs MLflow to finish. Every stage writes its own
files (results/<res>/losses.tsv, train.json, eval.json) whatever happens here; MLflow is a copy.

Layout of the store (experiment `mlflow.experiment`; cf. composer's `loggers/mlflow_logger.py`):
    parent run  one per pipeline invocation: every key of params.yaml as a flattened param
                (`train.stages.16.lr`), tags `progan.params_digest` and `mlflow.source.git.commit`.
      child run one per stage (tags `progan.stage=<res_px>`, `mlflow.parentRunId`): `progan train`
                and `progan evaluate` of the same stage log into the same child.

Steps: MLflow steps are integers, so a metric's step is the number of real images shown so far,
    step = round(total_kimg * 1000)  (unit "img", tag `progan.step_unit`); divide by 1000 for kimg.

Finding the parent, in order: env `PROGAN_MLFLOW_PARENT_RUN_ID` (the Snakefile's onstart sets it from
`progan track-start`), then `.progan/mlflow_parent.json` when it names the same store and params
digest and that run is still RUNNING (the report marks it FINISHED), else a new parent is created
under a file lock (`fcntl.flock`) so concurrent jobs make exactly one.

Failure: MLflow missing, unreachable, locked for too long or raising anything -> one warning line,
the tracker turns itself off and the stage goes on. SQLite "database is locked" is retried with
backoff first. A fresh SQLite file opened by many processes at once gets corrupted, hence
`progan track-start` (`run`) creates the DB, experiment and parent before any job starts.
"""
from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from progan import mlflow_view, paths, pipeline
from progan.fileio import read_json, sha256_file, write_json
from progan.log import log

PARENT_ENV = "PROGAN_MLFLOW_PARENT_RUN_ID"
PARENT_FILE = f"{paths.STATE_DIR}/mlflow_parent.json"
LOCK_FILE = f"{paths.STATE_DIR}/mlflow.lock"
STAGE_TAG = "progan.stage"
JOBS = pipeline.mlflow_jobs()     # the stages that log a child run (pipeline.STAGES: train, evaluate)
_PARENT_TAG = "mlflow.parentRunId"
_BATCH = 100                 # MLflow's log_batch takes at most 100 params / 1000 metrics per call
_MAX_PARAM_CHARS = 6000      # MLflow's limit on a param value
_LOCK_WAIT_S = 120.0         # keep retrying "database is locked" this long (each try already waits 20 s)


# ---- store and retries ----------------------------------------------------------------------------

def tracking_uri(params) -> str:
    """`MLFLOW_TRACKING_URI` if set, else `mlflow.tracking_uri`; relative sqlite paths -> absolute."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or str(params.mlflow.tracking_uri)
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = uri[len(prefix):]
        if path and path != ":memory:" and not path.startswith("/"):
            return prefix + str((Path(params.root) / path).resolve())
    return uri


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:////"):
        return Path(uri[len("sqlite:///"):])
    return None


def _mlflow():
    """Import mlflow lazily, with HTTP retries short enough that a dead server costs seconds, not minutes."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0.5")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    import mlflow

    return mlflow


def _is_locked(err: BaseException) -> bool:
    while err is not None:
        text = str(err).lower()
        if "database is locked" in text or "database table is locked" in text or "database is busy" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def _retry(fn: Callable, *args, **kwargs):
    """Call fn, retrying SQLite lock errors with capped exponential backoff and jitter for up to
    _LOCK_WAIT_S; any other error raises at once."""
    deadline = time.monotonic() + _LOCK_WAIT_S
    for attempt in itertools.count():
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not _is_locked(e) or time.monotonic() > deadline:
                raise
            time.sleep(min(0.05 * 2**attempt, 2.0) * (0.5 + random.random()))


def _client(uri: str, root: Path):
    """An MlflowClient on `uri`. SQLite is opened first with sqlite3: MLflow's own engine retries an
    unopenable file for ~100 s before failing, this fails in milliseconds. A new SQLite file is put in
    WAL mode (persistent): readers no longer block the writer, the fix for "database is locked"
    with many jobs logging at once (https://sqlite.org/wal.html). The store is opened under the file
    lock, so jobs started without `progan track-start` never create its tables concurrently (a
    half-migrated store cannot be told from a finished one, so the lock is taken every time)."""
    db = _sqlite_path(uri)
    if db is None:
        return _mlflow().MlflowClient(tracking_uri=uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    mlflow = _mlflow()
    with _file_lock(root):
        con = sqlite3.connect(db, timeout=20)
        try:
            con.execute("select 1")
            if not con.execute("select count(*) from sqlite_master").fetchone()[0]:
                con.execute("pragma journal_mode=wal")
        finally:
            con.close()
        return _retry(mlflow.MlflowClient, tracking_uri=uri)   # creates the tables of a new store


def _experiment_id(client, params, uri: str) -> str:
    """Get or create the experiment (artifacts beside a SQLite DB, in mlartifacts/), tagged so that the MLflow UI
    shows it as model training with the per-stage SWD view (progan.mlflow_view)."""
    from mlflow.exceptions import MlflowException

    name = str(params.mlflow.experiment)
    exp = _retry(client.get_experiment_by_name, name)
    if exp is None:
        db = _sqlite_path(uri)
        location = (db.parent / "mlartifacts").as_uri() if db is not None else None
        try:
            exp_id = _retry(client.create_experiment, name, artifact_location=location)
        except MlflowException as e:  # another process created it in between
            exp = _retry(client.get_experiment_by_name, name)
            if exp is None:
                raise e
    if exp is not None:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            _retry(client.restore_experiment, exp_id)
    for key, value in mlflow_view.tags_to_set(params, dict(exp.tags) if exp is not None else {}).items():
        _retry(client.set_experiment_tag, exp_id, key, value)
    return exp_id


# ---- params, git, locks ----------------------------------------------------------------------------

def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{"train": {"stages": {"16": {"lr": 0.001}}}} -> {"train.stages.16.lr": "0.001"} (JSON for non-str)."""
    if hasattr(tree, "to_dict"):
        tree = tree.to_dict()
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    text = tree if isinstance(tree, str) else json.dumps(tree)
    return {prefix: text[:_MAX_PARAM_CHARS]}


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


@contextlib.contextmanager
def _file_lock(root: Path) -> Iterator[None]:
    """Exclusive lock between processes on this machine (get-or-create of the parent and children)."""
    path = Path(root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _log_params(client, run_id: str, values: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in values.items()]
    for i in range(0, len(items), _BATCH):
        _retry(client.log_batch, run_id, params=items[i:i + _BATCH])


# ---- parent and child runs -------------------------------------------------------------------------

def _create_parent(client, exp_id: str, params, uri: str) -> str:
    root = Path(params.root)
    tags = {"progan.role": "pipeline", "progan.params_digest": params.digest(), "progan.step_unit": "img",
            "progan.root": str(root)}
    commit = _git_commit(root)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    name = "pipeline " + time.strftime("%Y-%m-%d %H:%M:%S")
    run = _retry(client.create_run, exp_id, tags=tags, run_name=name)
    run_id = run.info.run_id
    _log_params(client, run_id, flatten(params))
    write_json(root / PARENT_FILE, {"run_id": run_id, "experiment_id": exp_id, "tracking_uri": uri,
                                    "params_digest": params.digest()})
    return run_id


def _usable(client, run_id: str, running_only: bool = False) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        info = _retry(client.get_run, run_id).info
    except MlflowException:
        return False
    return info.lifecycle_stage == "active" and (info.status == "RUNNING" or not running_only)


def _parent_from_file(client, params, uri: str) -> str | None:
    path = Path(params.root) / PARENT_FILE
    try:
        info = read_json(path)
    except (OSError, ValueError):
        return None
    if info.get("tracking_uri") != uri or info.get("params_digest") != params.digest():
        return None  # another store, or params changed since: a new pipeline invocation
    run_id = info.get("run_id")
    # A parent the report has FINISHED belongs to an invocation that is over (e.g. `dvc repro` has no
    # onstart hook): the next job starts a new one. A RUNNING one is this invocation, or its resumption.
    return run_id if run_id and _usable(client, run_id, running_only=True) else None


def _parent_run_id(client, exp_id: str, params, uri: str) -> str:
    """The env var, else the state file, else a new parent (created under the lock)."""
    env_id = os.environ.get(PARENT_ENV)
    if env_id:
        if _usable(client, env_id):
            return env_id
        log.warning("%s=%s is not a run of %s; using or creating another parent", PARENT_ENV, env_id, uri)
    run_id = _parent_from_file(client, params, uri)
    if run_id:
        return run_id
    with _file_lock(params.root):
        return _parent_from_file(client, params, uri) or _create_parent(client, exp_id, params, uri)


def _find_child(client, exp_id: str, parent_id: str, res: int):
    flt = f"tags.`{_PARENT_TAG}` = '{parent_id}' and tags.`{STAGE_TAG}` = '{int(res)}'"
    runs = _retry(client.search_runs, [exp_id], filter_string=flt, max_results=10,
                  order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def _child_run_id(client, exp_id: str, parent_id: str, params, res: int) -> str:
    run = _find_child(client, exp_id, parent_id, res)
    if run is not None:
        return run.info.run_id
    with _file_lock(params.root):
        run = _find_child(client, exp_id, parent_id, res)
        if run is not None:
            return run.info.run_id
        tags = {_PARENT_TAG: parent_id, STAGE_TAG: str(int(res)), "progan.role": "stage",
                "progan.step_unit": "img", "progan.params_digest": params.digest()}
        return _retry(client.create_run, exp_id, tags=tags, run_name=f"stage {int(res)}px").info.run_id



def _training_run_id(client, exp_id: str, params, res: int) -> str | None:
    """The child that trained the checkpoint now in results/<res>/ (matched by its sha256), if any."""
    ckpt = Path(params.root) / paths.checkpoint(res)
    if not ckpt.is_file():
        return None
    flt = f"tags.`{STAGE_TAG}` = '{int(res)}' and tags.`progan.checkpoint_sha256` = '{sha256_file(ckpt)}'"
    runs = _retry(client.search_runs, [exp_id], filter_string=flt, max_results=1,
                  order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


# ---- the tracker a stage logs through --------------------------------------------------------------

def _one_line(err: BaseException) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= 240 else text[:237] + "..."


class StageTracker:
    """Logs into one child run. Never raises: the first failure warns once and turns it off."""

    def __init__(self, client=None, run_id: str | None = None, label: str = ""):
        self._client = client
        self.run_id = run_id
        self._label = label
        self.enabled = client is not None and run_id is not None

    def _guard(self, fn: Callable, *args) -> None:
        if not self.enabled:
            return
        try:
            fn(*args)
        except Exception as e:
            self.enabled = False
            log.warning("MLflow tracking off for %s (results/ files are unaffected): %s", self._label, _one_line(e))

    def log_params(self, values: dict) -> None:
        """Flattened params; a key already logged with another value keeps its first value (MLflow rule)."""
        self._guard(self._log_params, values)

    def _log_params(self, values: dict, attempts: int = 3) -> None:
        try:
            self._log_params_once(values)
        except Exception as e:  # another job logged one of these keys between our read and our write
            if attempts <= 1 or "unique constraint" not in str(e).lower():
                raise
            self._log_params(values, attempts - 1)

    def _log_params_once(self, values: dict) -> None:
        have = _retry(self._client.get_run, self.run_id).data.params
        new = {k: v for k, v in flatten(dict(values)).items() if k not in have}
        kept = sorted(k for k, v in flatten(dict(values)).items() if k in have and have[k] != v)
        if kept:
            log.info("MLflow params already set in run %s, kept the first value: %s", self.run_id, ", ".join(kept))
        _log_params(self._client, self.run_id, new)

    def log_metrics(self, values: dict[str, float], step_kimg: float) -> None:
        """Metrics at step = round(step_kimg * 1000) images (MLflow steps are integers)."""
        self._guard(self._log_metrics, values, step_kimg)

    def _log_metrics(self, values: dict[str, float], step_kimg: float) -> None:
        from mlflow.entities import Metric

        step = int(round(float(step_kimg) * 1000))
        now_ms = int(time.time() * 1000)
        metrics = [Metric(str(k), float(v), now_ms, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            _retry(self._client.log_batch, self.run_id, metrics=metrics[i:i + 1000])

    def log_artifact(self, path: str | os.PathLike) -> None:
        """Copy a file (or a folder's files) into the run's artifacts."""
        self._guard(self._log_artifact, path)

    def _log_artifact(self, path) -> None:
        path = Path(path)
        if path.is_dir():
            _retry(self._client.log_artifacts, self.run_id, str(path))
        else:
            _retry(self._client.log_artifact, self.run_id, str(path))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._guard(lambda: [_retry(self._client.set_tag, self.run_id, k, str(v)) for k, v in tags.items()])


def _open_stage(params, res: int, job: str) -> StageTracker:
    uri = tracking_uri(params)
    client = _client(uri, params.root)
    exp_id = _experiment_id(client, params, uri)
    parent_id = _parent_run_id(client, exp_id, params, uri)
    run_id = _child_run_id(client, exp_id, parent_id, params, res)
    _retry(client.update_run, run_id, "RUNNING")
    tracker = StageTracker(client, run_id, f"{job} {res}px")
    prefix = f"train.stages.{int(res)}" if job == "train" else "evaluate"
    section = params.stage(res) if job == "train" else params.evaluate
    tracker.log_params({"res_px": int(res), **{f"{prefix}.{k}": v for k, v in section.to_dict().items()}})
    if job == "evaluate":
        tags = _retry(client.get_run, run_id).data.tags
        trained_by = run_id if tags.get("progan.trained") == "true" else _training_run_id(client, exp_id, params, res)
        if trained_by:
            tracker.set_tags({"progan.train_run_id": trained_by})
    return tracker


def _close_stage(tracker: StageTracker, params, res: int, job: str, status: str) -> None:
    """Attach the stage's files, tag a trained checkpoint, set the run's status. Never raises."""
    def close() -> None:
        root = Path(params.root)
        if status == "FINISHED":
            for rel in pipeline.mlflow_artifacts(params, job, res):
                if (root / rel).is_file():
                    _retry(tracker._client.log_artifact, tracker.run_id, str(root / rel))
            ckpt = root / paths.checkpoint(res)
            if job == "train" and ckpt.is_file():
                for key, value in (("progan.trained", "true"), ("progan.checkpoint_sha256", sha256_file(ckpt))):
                    _retry(tracker._client.set_tag, tracker.run_id, key, value)
        _retry(tracker._client.set_terminated, tracker.run_id, status)

    tracker._guard(close)


@contextlib.contextmanager
def stage_run(params, res: int, job: str) -> Iterator[StageTracker]:
    """The tracker of stage `res` for `job` ("train" or "evaluate"), logging into the stage's child run.

    Only rank 0 logs (env RANK). On a clean exit the stage's own files are attached as artifacts
    (samples.png, train.json, losses.tsv / eval.json), train tags the run with its checkpoint's
    sha256 so a later evaluate can point `progan.train_run_id` at it, and the run is FINISHED
    (FAILED / KILLED when the block raises; the exception always propagates).
    """
    if job not in JOBS:
        raise ValueError(f"job must be one of {JOBS}, got {job!r}")
    if os.environ.get("RANK", "0").strip() not in ("", "0"):   # torchrun / DDP: rank 0 logs
        yield StageTracker(label=f"{job} {res}px")
        return
    try:
        tracker = _open_stage(params, res, job)
    except Exception as e:
        log.warning("MLflow tracking off for %s %spx (results/ files are unaffected): %s", job, res, _one_line(e))
        tracker = StageTracker(label=f"{job} {res}px")
    try:
        yield tracker
    except KeyboardInterrupt:
        _close_stage(tracker, params, res, job, "KILLED")
        raise
    except BaseException:
        _close_stage(tracker, params, res, job, "FAILED")
        raise
    _close_stage(tracker, params, res, job, "FINISHED")


# ---- pipeline level --------------------------------------------------------------------------------

def run(params) -> None:
    """`progan track-start`: create the store, the experiment and a new parent run before jobs start;
    write its id to .progan/mlflow_parent.json and print it on stdout (nothing when MLflow fails)."""
    uri = tracking_uri(params)
    try:
        client = _client(uri, params.root)
        exp_id = _experiment_id(client, params, uri)
        with _file_lock(params.root):
            run_id = _create_parent(client, exp_id, params, uri)
    except Exception as e:
        log.warning("MLflow tracking off (%s): %s; the stages run without it", uri, _one_line(e))
        return
    log.info("MLflow parent run %s in %s (experiment %s); its runs: %s", run_id, uri, params.mlflow.experiment,
             mlflow_view.runs_url(uri, exp_id))
    print(run_id)
    sys.stdout.flush()


def _link_stage_runs(client, exp_id: str, parent_id: str, params) -> None:
    """Tag the parent with the child run behind every stage: its own child, or, for a stage the workflow
    skipped as up to date, the earlier child that trained the checkpoint now in results/ (by sha256).
    Tags `progan.stage_run.<res>` = run id and `progan.stage_reused.<res>` = true|false."""
    for res in params.resolutions:
        child = _find_child(client, exp_id, parent_id, res)
        run_id = child.info.run_id if child is not None else _training_run_id(client, exp_id, params, res)
        if run_id is not None:
            _retry(client.set_tag, parent_id, f"progan.stage_run.{res}", run_id)
            _retry(client.set_tag, parent_id, f"progan.stage_reused.{res}", str(child is None).lower())


def log_pipeline_summary(params, metrics: dict[str, float], artifacts: list[str]) -> None:
    """Log the report's headline metrics (step 0) and files to the parent run and mark it FINISHED."""
    uri = tracking_uri(params)
    try:
        client = _client(uri, params.root)
        exp_id = _experiment_id(client, params, uri)
        parent_id = _parent_run_id(client, exp_id, params, uri)
    except Exception as e:
        log.warning("MLflow tracking off for the report (results/ files are unaffected): %s", _one_line(e))
        return
    tracker = StageTracker(client, parent_id, "the report")
    tracker._guard(lambda: _link_stage_runs(client, exp_id, parent_id, params))
    tracker.log_metrics(metrics, 0)
    for path in artifacts:
        tracker.log_artifact(path)
    tracker._guard(lambda: _retry(client.set_terminated, parent_id, "FINISHED"))
    if tracker.enabled:
        log.info("MLflow: the runs of experiment %s, SWD per stage: %s (`mlflow ui --backend-store-uri %s`)",
                 params.mlflow.experiment, mlflow_view.runs_url(uri, exp_id), uri)
