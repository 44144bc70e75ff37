"""progan.tracking against a real MLflow SQLite store in tmp_path, read back with MlflowClient."""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from progan import params as params_mod
from progan import paths, tracking
from progan.log import log

REPO = Path(__file__).resolve().parents[1]
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


def write_params(root: Path, size: int = 512, uri: str = "sqlite:///mlflow.db") -> Path:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    stage = {"batch": 4, "lr": 0.001, "transition_kimg": 1, "stabilize_kimg": 1}
    data["crop"]["size"] = size
    data["train"]["stages"] = {str(2**k): dict(stage, transition_kimg=0 if k == 2 else 1)
                               for k in range(2, size.bit_length())}
    data["mlflow"] = {"tracking_uri": uri, "experiment": "progan-test"}
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root / "params.yaml"


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    return params_mod.load(write_params(tmp_path / "proj"))


@pytest.fixture
def warnings_seen():
    """Warning lines of the `progan` logger (captured directly: log.setup() may turn propagation off)."""
    lines: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                lines.append(record.getMessage())

    handler = Grab()
    log.addHandler(handler)
    yield lines
    log.removeHandler(handler)


def client_for(p):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking.tracking_uri(p))


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ---- pure helpers ----------------------------------------------------------------------------------

def test_flatten_and_uri(project, monkeypatch):
    flat = tracking.flatten({"train": {"stages": {"16": {"lr": 0.001}}, "betas": [0.0, 0.99]},
                             "data": {"url": None, "source": "celeba"}, "amp": False})
    assert flat == {"train.stages.16.lr": "0.001", "train.betas": "[0.0, 0.99]", "data.url": "null",
                    "data.source": "celeba", "amp": "false"}
    assert tracking.flatten(project)["train.stages.16.stabilize_kimg"] == "1"
    root = project.root.resolve()
    assert tracking.tracking_uri(project) == f"sqlite:///{root}/mlflow.db"      # relative -> absolute
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking.tracking_uri(project) == "sqlite:////elsewhere/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel/x.db")
    assert tracking.tracking_uri(project) == f"sqlite:///{root}/rel/x.db"


# ---- parent, child, history ------------------------------------------------------------------------

def test_parent_child_metric_history_and_evaluate_joins(project, capsys, warnings_seen):
    tracking.run(project)
    parent_id = capsys.readouterr().out.strip()
    state = json.loads((project.root / tracking.PARENT_FILE).read_text())
    assert state["run_id"] == parent_id and state["params_digest"] == project.digest()

    samples = project.root / paths.samples_png(16)
    samples.parent.mkdir(parents=True)
    with tracking.stage_run(project, 16, "train") as t:
        assert t.enabled
        t.log_params({"device": "cpu"})
        for tick in range(1, 4):  # ticks at 0.5, 1.0, 1.5 total kimg
            t.log_metrics({"d_loss": 1.0 / tick, "alpha": min(1.0, tick / 2)}, step_kimg=0.5 * tick)
        samples.write_bytes(b"\x89PNG fake grid")
        (project.root / paths.checkpoint(16)).write_bytes(b"weights v1")
    train_child = t.run_id

    with tracking.stage_run(project, 16, "evaluate") as e:
        e.log_metrics({"swd_avg": 7.5, "swd_16": 9.0}, step_kimg=1.5)
    assert e.run_id == train_child                                     # same child for the stage
    assert warnings_seen == []

    client = client_for(project)
    parent = client.get_run(parent_id)
    assert parent.data.params["train.stages.16.lr"] == "0.001"
    assert parent.data.params["crop.size"] == "512"
    assert parent.data.tags["progan.params_digest"] == project.digest()
    child = client.get_run(train_child)
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.data.tags["progan.stage"] == "16"
    assert child.data.tags["progan.train_run_id"] == train_child
    assert child.info.status == "FINISHED"
    assert child.data.params["train.stages.16.batch"] == "4"
    assert child.data.params["evaluate.num_images"] == "16384"
    assert child.data.params["device"] == "cpu" and child.data.params["res_px"] == "16"
    # step = images shown = round(total_kimg * 1000)
    assert history(client, train_child, "d_loss") == [(500, 1.0), (1000, 0.5), (1500, pytest.approx(1 / 3))]
    assert history(client, train_child, "alpha") == [(500, 0.5), (1000, 1.0), (1500, 1.0)]
    assert history(client, train_child, "swd_16") == [(1500, 9.0)]
    assert {a.path for a in client.list_artifacts(train_child)} == {"samples.png"}
    exp = client.get_experiment_by_name("progan-test")
    assert exp.artifact_location == (project.root.resolve() / "mlartifacts").as_uri()

    # Next invocation (new parent): train is up to date and skipped, evaluate makes a new child that
    # points at the child that trained the checkpoint, found by the checkpoint's sha256.
    tracking.run(project)
    parent2 = capsys.readouterr().out.strip()
    assert parent2 != parent_id
    with tracking.stage_run(project, 16, "evaluate") as e2:
        e2.log_metrics({"swd_avg": 7.0}, step_kimg=1.5)
    child2 = client.get_run(e2.run_id)
    assert e2.run_id != train_child and child2.data.tags["mlflow.parentRunId"] == parent2
    assert child2.data.tags["progan.train_run_id"] == train_child
    # A retrained checkpoint no longer matches: no pointer to a wrong run.
    (project.root / paths.checkpoint(8)).parent.mkdir(parents=True)
    (project.root / paths.checkpoint(8)).write_bytes(b"never tracked")
    with tracking.stage_run(project, 8, "evaluate") as e3:
        pass
    assert "progan.train_run_id" not in client.get_run(e3.run_id).data.tags


def test_env_parent_wins_and_failed_stage_is_marked(project, monkeypatch, capsys):
    tracking.run(project)
    first = capsys.readouterr().out.strip()
    tracking.run(project)
    second = capsys.readouterr().out.strip()           # the file now names the second
    monkeypatch.setenv(tracking.PARENT_ENV, first)
    with pytest.raises(ZeroDivisionError):              # the stage's own error propagates untouched
        with tracking.stage_run(project, 4, "train") as t:
            t.log_metrics({"g_loss": 2.0}, step_kimg=0.001)
            1 / 0
    run = client_for(project).get_run(t.run_id)
    assert run.data.tags["mlflow.parentRunId"] == first != second
    assert run.info.status == "FAILED"
    assert history(client_for(project), t.run_id, "g_loss") == [(1, 2.0)]


def test_summary_goes_to_parent(project, capsys):
    tracking.run(project)
    parent_id = capsys.readouterr().out.strip()
    html = project.root / "index.html"
    html.write_text("<html></html>")
    tracking.log_pipeline_summary(project, {"swd_avg_r16": 4.25, "swd_avg_r8": 6.0}, [str(html)])
    run = client_for(project).get_run(parent_id)
    assert run.data.metrics == {"swd_avg_r16": 4.25, "swd_avg_r8": 6.0}
    assert run.info.status == "FINISHED"
    assert [a.path for a in client_for(project).list_artifacts(parent_id)] == ["index.html"]
    # That invocation is over: a later job (e.g. under `dvc repro`, no onstart hook) starts a new parent.
    with tracking.stage_run(project, 4, "train") as t:
        pass
    new_parent = client_for(project).get_run(t.run_id).data.tags["mlflow.parentRunId"]
    assert new_parent != parent_id
    assert json.loads((project.root / tracking.PARENT_FILE).read_text())["run_id"] == new_parent


def test_experiment_opens_on_training_runs_with_the_swd_view(project, capsys):
    """MLflow 3's UI: the experiment kind tag says model training; the saved view (tag mlflow.sharedViewState.*)
    shows the parent's swd_avg_r<R> of every stage as columns, in growth order (tests/test_mlflow_ui.py opens it)."""
    from progan import mlflow_view

    tracking.run(project)
    parent_id = capsys.readouterr().out.strip()
    client = client_for(project)
    exp = client.get_experiment_by_name("progan-test")
    assert exp.tags[mlflow_view.KIND_TAG] == "custom_model_development"
    view = json.loads(exp.tags[mlflow_view.VIEW_TAG])
    assert view["name"] == "progan: SWD per stage" and isinstance(view["createdAt"], int)
    columns = json.loads(view["state"])["selectedColumns"]
    assert columns == [f"metrics.`swd_avg_r{r}`" for r in project.resolutions] == json.loads(view["state"])[
        "columnOrder"]
    tracking.log_pipeline_summary(project, {f"swd_avg_r{r}": 1.0 for r in project.resolutions}, [])
    metrics = client.get_run(parent_id).data.metrics
    assert {c.split("`")[1] for c in columns} <= set(metrics)                      # the columns are the parent's
    assert mlflow_view.tags_to_set(project, exp.tags) == {}                        # next jobs write nothing
    assert mlflow_view.tags_to_set(project, {**exp.tags, mlflow_view.KIND_TAG: "genai_development"}) == {}  # chosen
    assert mlflow_view.tags_to_set(project, {**exp.tags, mlflow_view.KIND_TAG: "genai_development_inferred"}) == {
        mlflow_view.KIND_TAG: "custom_model_development"}                          # only guessed by the UI
    assert mlflow_view.runs_url(tracking.tracking_uri(project), exp.experiment_id) == (
        f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
        f"&viewStateShareKey=progan-stages")
    assert mlflow_view.runs_url("https://mlflow.example.org/", "7").startswith("https://mlflow.example.org/#/")


# ---- failure: never raises, one warning ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["http", "not-a-dir"])
def test_unreachable_store_warns_once_and_stage_goes_on(tmp_path, monkeypatch, warnings_seen, capsys, kind):
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    uri = "http://127.0.0.1:9" if kind == "http" else f"sqlite:///{blocker}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    p = params_mod.load(write_params(tmp_path / "proj", size=8))
    tracking.run(p)
    assert capsys.readouterr().out == ""
    assert len(warnings_seen) == 1 and uri in warnings_seen[0]
    with tracking.stage_run(p, 8, "train") as t:
        for tick in range(5):
            t.log_metrics({"d_loss": 1.0}, step_kimg=tick)
        t.log_artifact(blocker)
        done = True
    assert done and not t.enabled and t.run_id is None
    assert len(warnings_seen) == 2 and "train 8px" in warnings_seen[1]
    tracking.log_pipeline_summary(p, {"swd_avg_r8": 1.0}, [])
    assert len(warnings_seen) == 3


def test_failure_mid_stage_warns_once_then_stays_quiet(project, warnings_seen):
    client = tracking._client(tracking.tracking_uri(project), project.root)
    tracking._experiment_id(client, project, tracking.tracking_uri(project))
    t = tracking.StageTracker(client, "0" * 32, "train 16px")   # a run the store does not have
    for tick in range(4):
        t.log_metrics({"d_loss": 1.0}, step_kimg=tick)
    t.log_params({"a": 1})
    assert not t.enabled
    assert len(warnings_seen) == 1 and warnings_seen[0].startswith("MLflow tracking off for train 16px")


def test_rank_nonzero_does_not_log(project, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with tracking.stage_run(project, 4, "train") as t:
        t.log_metrics({"d_loss": 1.0}, step_kimg=1)
    assert not t.enabled and not (project.root / "mlflow.db").exists()


# ---- 8 concurrent writer processes -----------------------------------------------------------------

TICKS = 10
WRITERS = [(res, job) for res in (4, 8, 16, 32) for job in ("train", "evaluate")]


def _writer(params_path: str, index: int) -> None:
    res, job = WRITERS[index]
    p = params_mod.load(params_path)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)
    with tracking.stage_run(p, res, job) as t:
        for tick in range(1, TICKS + 1):
            t.log_metrics({f"{job}_loss": tick + index / 10, f"{job}_alpha": tick / TICKS}, step_kimg=tick)
    Path(params_path).with_name(f"writer{index}.log").write_text("\n".join(seen))
    os._exit(0 if t.enabled else 3)


@pytest.mark.parametrize("store", ["pre-created", "fresh"])
def test_eight_concurrent_writer_processes(tmp_path, monkeypatch, store):
    """pre-created: the store is made by the real CLI (as the Snakefile's onstart does), then the parent
    file is removed so the 8 jobs also race to get-or-create the parent and the 4 stage children.
    fresh: no track-start at all (a hand-run or `dvc repro --jobs 8`): the jobs also race to create the DB."""
    for var in ("MLFLOW_TRACKING_URI", tracking.PARENT_ENV, "RANK"):
        monkeypatch.delenv(var, raising=False)
    params_path = write_params(tmp_path / "proj", size=32)
    first_parent = None
    if store == "pre-created":
        out = subprocess.run([sys.executable, "-m", "progan.cli", "track-start", "--params", str(params_path)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        first_parent = out.stdout.strip()
        (params_path.parent / tracking.PARENT_FILE).unlink()

    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  imported once here, not in each writer
    import sqlalchemy.orm

    sqlalchemy.orm.configure_mappers()
    ctx = multiprocessing.get_context("fork")  # the test process has not opened this store: no shared engine
    procs = [ctx.Process(target=_writer, args=(str(params_path), i)) for i in range(len(WRITERS))]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
    logs = {i: (params_path.parent / f"writer{i}.log").read_text() for i in range(len(WRITERS))}
    assert [proc.exitcode for proc in procs] == [0] * len(WRITERS), logs
    assert not any("MLflow tracking off" in text for text in logs.values()), logs
    con = sqlite3.connect(params_path.parent / "mlflow.db")
    assert con.execute("pragma journal_mode").fetchone() == ("wal",)
    con.close()

    p = params_mod.load(params_path)
    client = client_for(p)
    exp_id = client.get_experiment_by_name("progan-test").experiment_id
    runs = client.search_runs([exp_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("progan.role") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("progan.role") == "stage"]
    assert len(parents) == (2 if first_parent else 1)           # track-start's (if any) and exactly one more
    new_parent = next(r.info.run_id for r in parents if r.info.run_id != first_parent)
    assert sorted(int(c.data.tags["progan.stage"]) for c in children) == [4, 8, 16, 32]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {new_parent}
    for child in children:
        res = int(child.data.tags["progan.stage"])
        for index, (r, job) in enumerate(WRITERS):
            if r != res:
                continue
            got = history(client, child.info.run_id, f"{job}_loss")
            assert got == [(1000 * t, pytest.approx(t + index / 10)) for t in range(1, TICKS + 1)]
            assert len(history(client, child.info.run_id, f"{job}_alpha")) == TICKS
