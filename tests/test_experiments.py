"""`dvc exp show` a person can read (issue #16): after two `dvc exp run`s in a real git + DVC workspace of the tiny
4-stage DAG, the metrics columns are the headline numbers of each stage (progan.headline), named once each, beside
the changed param; the README's compare recipe (`--only-changed --keep`, `dvc exp diff`, `dvc plots diff`) works.
The experiments change only the last stage, so each re-runs train@32, evaluate@32 and the report."""
from __future__ import annotations

import csv
import io
import subprocess

import pytest

from progan import headline, params as params_mod, paths, pipeline, tracking

from helpers import make_workspace, tiny_params, tool_env

pytestmark = pytest.mark.slow
RES = [4, 8, 16, 32]


def _run(ws, *cmd) -> str:
    proc = subprocess.run(cmd, cwd=ws, env=tool_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def _table(text: str) -> tuple[list[str], list[dict]]:
    rows = list(csv.DictReader(io.StringIO(text)))
    return list(rows[0]), rows


def _expected_metrics(ws) -> set[str]:
    """The headline names of every stage, from the files the stages wrote."""
    import json

    names = set()
    for r in RES:
        names |= set(headline.training(json.loads((ws / paths.train_json(r)).read_text())))
        names |= set(headline.evaluation(json.loads((ws / paths.eval_json(r)).read_text())))
    return names


@pytest.mark.xdist_group("experiments")
def test_two_experiments_then_compare(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    tiny_params(ws, size_px=32, data__max_images=24, evaluate__num_images=16, evaluate__msssim_pairs=4,
                mlflow__tracking_uri="sqlite:////proc/progan-no-mlflow/mlflow.db",     # not what this is about
                train__stages={str(r): {"batch": 8, "lr": 0.001, "transition_kimg": 0 if r == 4 else 0.05,
                                        "stabilize_kimg": 0.05} for r in RES})
    (ws / "dvc.yaml").write_text(pipeline.dvc_yaml(params_mod.load(ws / "params.yaml")))
    (ws / ".gitignore").write_text("logs/\n.progan/\n.snakemake/\n")
    _run(ws, "git", "init", "-q")
    _run(ws, "git", "config", "user.email", "test@example.org")
    _run(ws, "git", "config", "user.name", "test")
    _run(ws, "dvc", "init", "-q")
    _run(ws, "dvc", "repro")
    _run(ws, "git", "add", "-A")
    _run(ws, "git", "commit", "-qm", "baseline")
    for name, lr in (("lr2", 0.002), ("lr3", 0.003)):
        _run(ws, "dvc", "exp", "run", "-n", name, "-S", f"train.stages.32.lr={lr}")

    header, rows = _table(_run(ws, "dvc", "exp", "show", "--csv"))
    by_name = {r["Experiment"] or r["rev"]: r for r in rows}
    assert {"lr2", "lr3"} <= set(by_name)
    assert by_name["lr2"]["train.stages.32.lr"] == "0.002" and by_name["lr3"]["train.stages.32.lr"] == "0.003"
    expected = _expected_metrics(ws)
    assert {f"swd_avg_r{r}" for r in RES} | {"swd_32px_r32", "swd_16px_r32", "d_loss_r32", "img_per_s_r32",
                                             "msssim_fake_r32"} <= expected
    params_keys = set(tracking.flatten(params_mod.load(ws / "params.yaml")))        # train.stages.4.lr, seed, ...
    metric_columns = {h for h in header if "/" not in h} - params_keys - {"Experiment", "rev", "typ", "Created",
                                                                          "parent", "State", "Executor"}
    assert metric_columns == expected                                       # the headline numbers, no file prefix
    assert len(metric_columns) <= 7 * len(RES)
    assert by_name["lr2"]["swd_avg_r32"] != by_name["lr3"]["swd_avg_r32"]            # the stage that changed
    assert by_name["lr2"]["swd_avg_r4"] == by_name["lr3"]["swd_avg_r4"] != ""        # the stages reused

    # the README's compare recipe
    header, rows = _table(_run(ws, "dvc", "exp", "show", "--csv", "--only-changed", "--keep", "^swd_avg_"))
    assert len(header) < 60, header
    assert {f"swd_avg_r{r}" for r in RES} | {"train.stages.32.lr", "swd_32px_r32"} <= set(header)
    assert "train.stages.16.lr" not in header and "swd_4px_r4" not in header        # unchanged: dropped
    diff = _run(ws, "dvc", "exp", "diff", "lr2", "lr3")
    assert "swd_avg_r32" in diff and "train.stages.32.lr" in diff and "swd_avg_r4 " not in diff
    _run(ws, "dvc", "plots", "diff", "lr2", "lr3", "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "lr2" in page and "lr3" in page and paths.REPORT_SWD_PLOT in page and paths.REPORT_LOSS_PLOT in page
