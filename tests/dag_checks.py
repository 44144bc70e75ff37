"""What a finished run of the tiny DAG must contain, whichever way it ran (local Snakemake: test_workflow; SLURM:
test_slurm): checkpoints that load and chain, and the MLflow store read back through MlflowClient."""
from __future__ import annotations

import hashlib
from pathlib import Path

from progan import paths, tracking


def mlflow_runs(ws: Path, params):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name(params.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("progan.role") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("progan.role") == "stage"]
    return client, parents, children


def check_each_stage_resumed_from_the_one_before(ws: Path, resolutions: list[int]) -> None:
    import torch

    for r in resolutions:
        ckpt = torch.load(ws / paths.checkpoint(r), weights_only=True)
        assert ckpt["res_px"] == r
        if r == resolutions[0]:
            assert ckpt["prev_checkpoint_sha256"] is None
        else:
            prev = hashlib.sha256((ws / paths.checkpoint(r // 2)).read_bytes()).hexdigest()
            assert ckpt["prev_checkpoint_sha256"] == prev
            prev_ckpt = torch.load(ws / paths.checkpoint(r // 2), weights_only=True)
            assert ckpt["total_kimg"] > prev_ckpt["total_kimg"]


def check_first_mlflow_run(ws: Path, params, resolutions: list[int]) -> None:
    """One parent (all params, final SWD per stage, the report), one child per stage (losses per tick with
    step = images shown, SWD per level, the sample grid), read back through MlflowClient."""
    client, parents, children = mlflow_runs(ws, params)
    assert len(parents) == 1 and len(children) == len(resolutions)
    parent = parents[0]
    flat = tracking.flatten(params)
    top = resolutions[-1]
    for key in (f"train.stages.{top}.stabilize_kimg", "crop.size"):
        assert parent.data.params[key] == flat[key]
    assert {f"swd_avg_r{r}" for r in resolutions} <= set(parent.data.metrics)
    assert "index.html" in {a.path.split("/")[-1] for a in client.list_artifacts(parent.info.run_id)}
    for child in children:
        res = int(child.data.tags["progan.stage"])
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert parent.data.tags[f"progan.stage_run.{res}"] == child.info.run_id
        history = client.get_metric_history(child.info.run_id, "d_loss")
        assert history and all(h.step > 0 for h in history)
        assert "swd_avg" in child.data.metrics and f"swd_{res}" in child.data.metrics
        assert "samples.png" in {a.path.split("/")[-1] for a in client.list_artifacts(child.info.run_id)}
    # steps are total images shown, so stage 8's curve starts where stage 4's ends
    by_res = {int(c.data.tags["progan.stage"]): c for c in children}
    last4 = max(h.step for h in client.get_metric_history(by_res[4].info.run_id, "d_loss"))
    first8 = min(h.step for h in client.get_metric_history(by_res[8].info.run_id, "d_loss"))
    assert first8 > last4
