"""The DAG as users run it (issue #5): the full pipeline on ~200 real faces, downloaded from a local HTTP
server, through real `snakemake` and real `dvc repro`, then the "only what changed" cases on both tools.

The Inception metrics (issue #14): evaluate.fid.min_res_px 8 gives fid-stats@8 and fid-stats@16. The runs are
offline (conftest), so those write placeholders and eval.json has no fid/kid; then the weights arrive (a random-
weight file of the real network, pinned in the workspace's copy of src/, which the tools run through PYTHONPATH),
nothing re-runs by itself, and the one command the README gives makes the statistics and the numbers, which land
in eval.json, MLflow, the report and `dvc metrics show`.

Which jobs ran is read from the outputs themselves (a job that runs rewrites its outputs atomically, so their
mtime_ns changes); the tools' own plans are checked too (`snakemake -n`, `dvc status`).
"""
from __future__ import annotations

import functools
import http.server
import json
import math
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest
import yaml

from progan import params as params_mod, paths, pipeline

from dag_checks import check_each_stage_resumed_from_the_one_before, check_first_mlflow_run, mlflow_runs
from helpers import CELEBA_DIR, make_workspace, pin_inception_weights, random_inception_weights, tiny_params, tool_env

pytestmark = pytest.mark.slow
NUM_IMAGES = 200
SIZE_PX = 16


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """A real HTTP server on 127.0.0.1 serving a zip of real CelebA faces."""
    root = tmp_path_factory.mktemp("www")
    with zipfile.ZipFile(root / "faces.zip", "w") as zf:
        for f in sorted(CELEBA_DIR.glob("*.jpg"))[:NUM_IMAGES]:
            zf.write(f, f"faces/{f.name}")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/faces.zip"
    server.shutdown()


FID_KEY = "fid16"                  # evaluate.fid.num_images 16


@pytest.fixture(scope="module")
def inception_weights() -> bytes:
    return random_inception_weights()


def _workspace(tmp_path: Path, url: str, weights: bytes | None = None) -> tuple[Path, object]:
    ws = make_workspace(tmp_path / "ws")
    tiny_params(ws, size_px=SIZE_PX, data__source="url", data__url=url, data__folder=None, data__max_images=None,
                evaluate__fid__min_res_px=8, evaluate__fid__num_images=16, evaluate__fid__max_reals=32,
                evaluate__fid__batch=16)
    if weights is not None:
        pin_inception_weights(ws / "src", weights)
    params = params_mod.load(ws / "params.yaml")
    (ws / "dvc.yaml").write_text(pipeline.dvc_yaml(params))
    return ws, params


def _outputs(params) -> dict[str, list[str]]:
    return {job.id: job.out_paths for job in pipeline.jobs(params)}


def _stamp(ws: Path, params) -> dict[str, tuple]:
    stamps = {}
    for job_id, files in _outputs(params).items():
        marks = []
        for f in files:
            p = ws / f
            target = p / "manifest.csv" if p.is_dir() else p
            marks.append(target.stat().st_mtime_ns if target.exists() else None)
        stamps[job_id] = tuple(marks)
    return stamps


def _ran(before: dict, after: dict) -> set[str]:
    return {job for job in after if after[job] != before.get(job)}


def _edit(ws: Path, dotted: str, value) -> None:
    path = ws / "params.yaml"
    data = yaml.safe_load(path.read_text())
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _env(ws: Path) -> dict:
    """The tools' environment, running the workspace's copy of src/ (its pinned Inception weights)."""
    return {**tool_env(), "PYTHONPATH": str(ws / "src")}


def _snakemake(ws: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = ["snakemake", "--cores", "2", "-s", str(ws / "Snakefile"), "-d", str(ws), *args]
    return subprocess.run(cmd, cwd=ws, env=_env(ws), capture_output=True, text=True, timeout=600)


def _dvc(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=ws, env=_env(ws), capture_output=True, text=True, timeout=600)


def _check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


RES = [4, 8, 16]
STATS = {"fid-stats@8", "fid-stats@16"}         # once per resolution >= evaluate.fid.min_res_px 8
ALL = {"download", "crop", "pyramid", "report"} | {f"{s}@{r}" for s in ("train", "evaluate") for r in RES} | STATS
TRAINS = {"train@4", "train@8", "train@16"}
EVALS = {"evaluate@4", "evaluate@8", "evaluate@16"}
WEIGHTS_AT = "weights/offline-copy.pth"         # evaluate.inception_weights (beside the workspace): not there yet
CASES = [
    # (what to change, value, jobs Snakemake must run, jobs DVC must run)
    ("train.stages.16.stabilize_kimg", 0.2, {"train@16", "evaluate@16", "report"}, {"train@16", "evaluate@16", "report"}),
    ("crop.margin", 0.3, ALL - {"download"}, ALL - {"download"}),
    ("evaluate.num_images", 48, EVALS | {"report"}, EVALS | {"report"}),
    ("evaluate.fid.max_reals", 24, STATS | EVALS | {"report"}, STATS | EVALS | {"report"}),
    # where the weights are is no param of fid-stats or evaluate (they are pinned by sha256): pointing at another
    # copy re-runs no evaluation, only the report (its page shows every param)
    ("evaluate.inception_weights", WEIGHTS_AT, {"report"}, {"report"}),
    # A comment in the training code re-runs every training stage. Training is deterministic, so the
    # checkpoints come out bit-identical: DVC (content hashes) then skips the evaluations, Snakemake (mtimes)
    # re-runs them. The report reads train.json (wall-clock seconds) and re-runs under both.
    ("code", None, TRAINS | EVALS | {"report"}, TRAINS | {"report"}),
    ("nothing", None, set(), set()),
]


def _apply(ws: Path, what: str, value) -> None:
    if what == "evaluate.inception_weights":
        value = str(ws.parent / value)
    if what == "code":
        loop = ws / "src/progan/train/loop.py"
        loop.write_text(loop.read_text() + "\n# an edit to the training code\n")
    elif what != "nothing":
        _edit(ws, what, value)


def _check_reused_stages_are_linked(ws: Path, params) -> None:
    """After case 1 (only stage 16 re-ran) the new parent links stages 4 and 8 to the first run's children."""
    _, parents, children = mlflow_runs(ws, params)
    assert len(parents) == 2
    first, second = parents
    for res in (4, 8):
        assert second.data.tags[f"progan.stage_reused.{res}"] == "true"
        assert second.data.tags[f"progan.stage_run.{res}"] == first.data.tags[f"progan.stage_run.{res}"]
    assert second.data.tags["progan.stage_reused.16"] == "false"
    assert len(children) == len(RES) + 1


AFTER_WEIGHTS = STATS | {"evaluate@8", "evaluate@16", "report"}   # not evaluate@4: below evaluate.fid.min_res_px


def _weights_arrive(ws: Path, weights: bytes) -> None:
    path = ws.parent / WEIGHTS_AT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(weights)


def _check_offline(ws: Path) -> None:
    """Offline: placeholders, eval.json without fid/kid, one note saying why; the README's command in the log."""
    from progan.metrics import real_stats

    for r in (8, 16):
        assert real_stats.read_meta(ws / paths.fid_stats(r))["available"] is False
        result = json.loads((ws / paths.eval_json(r)).read_text())
        assert FID_KEY not in result and "swd_avg" in result["swd"]
        assert result["notes"][0].startswith("fid, kid: not computed: ")
    assert not (ws / paths.fid_stats(4)).exists()


def _check_inception_numbers(ws: Path, params) -> dict:
    """After the weights arrived and the README's command ran: fid/kid per stage >= 8 px from the fid-stats file in
    eval.json, the stage's MLflow child and the parent's summary, the report's table and curves; a note below."""
    results = {r: json.loads((ws / paths.eval_json(r)).read_text()) for r in RES}
    for r in (8, 16):
        ev = results[r]
        assert math.isfinite(ev[FID_KEY]) and ev[FID_KEY] > 0 and math.isfinite(ev["kid16"]), ev
        assert ev["inception"]["stats_file"] == paths.fid_stats(r) and ev["inception"]["num_reals"] == 24
        assert ev["notes"] == []
    assert FID_KEY not in results[4]
    assert results[4]["notes"] == ["fid, kid: not computed at 4 px (below evaluate.fid.min_res_px 8)"]
    _, parents, children = mlflow_runs(ws, params)
    assert parents[-1].data.metrics[f"{FID_KEY}_r16"] == pytest.approx(results[16][FID_KEY])
    assert parents[-1].data.metrics["kid16_r8"] == pytest.approx(results[8]["kid16"])
    child16 = [c for c in children if c.data.tags["progan.stage"] == "16" and FID_KEY in c.data.metrics]
    assert child16 and child16[-1].data.metrics[FID_KEY] == pytest.approx(results[16][FID_KEY])
    page = (ws / paths.REPORT_HTML).read_text()
    assert f"<th>{FID_KEY}</th><th>kid16</th>" in page and "FID, KID and IS per stage" in page
    assert "4\u00d74: fid, kid: not computed at 4 px (below evaluate.fid.min_res_px 8)" in page
    return results


def _check_logs_are_lines(ws: Path) -> None:
    """logs/<job>.log (`| tee`): progress as plain lines, no tqdm redraws (progan.log.progress)."""
    logs = sorted((ws / "logs").glob("*.log"))
    assert len(logs) == len(ALL)
    for log in logs:
        assert "\r" not in log.read_text(), log.name
    assert "crop: 100% " in (ws / "logs/crop.log").read_text()


def _check_snakemake_report(ws: Path, params) -> None:
    """`snakemake --report report.zip`: the outputs the stage table marks (pipeline.Out.report), each in its
    category with its caption; the metrics table rendered from results/report/swd.tsv."""
    _check(_snakemake(ws, "--report", "report.zip"))
    with zipfile.ZipFile(ws / "report.zip") as zf:
        files = {Path(n).name for n in zf.namelist() if "/data/raw/" in n}
        page = zf.read("report/report.html").decode()
    assert files == {"samples.png", "losses.tsv", "eval.json", "index.html", "swd.tsv", "losses.png", "swd.png"}
    marked = [o.path for j in pipeline.jobs(params) for o in j.outs if o.report]
    assert len(marked) == 3 * len(RES) + 4 and all(path in page for path in marked)
    for r, stage in zip(RES, (1, 2, 3)):
        assert f'"stage {stage}: {r} px": ["results/{r}/samples.png"]' in page           # Samples, per stage
    assert '"all stages": ["results/report/losses.png", "results/report/swd.png"]' in page   # Curves
    assert "Stage 16 px: images of G_ema" in page                                  # captions, per job
    assert '<th class=\\"head\\">swd_real_vs_real_avg</th>' in page                    # the table, rendered


@pytest.mark.xdist_group("e2e_snakemake")
def test_snakemake_full_run_then_only_what_changed(tmp_path, image_server, inception_weights):
    ws, params = _workspace(tmp_path, image_server, inception_weights)
    before = _stamp(ws, params)
    _check(_snakemake(ws))
    after = _stamp(ws, params)
    assert _ran(before, after) == ALL
    for r in RES:
        assert (ws / paths.eval_json(r)).exists()
    assert (ws / paths.REPORT_HTML).exists()
    check_each_stage_resumed_from_the_one_before(ws, RES)
    check_first_mlflow_run(ws, params, RES)
    _check_logs_are_lines(ws)
    _check_snakemake_report(ws, params)
    for what, value, expected, _ in CASES:
        _apply(ws, what, value)
        before = after
        _check(_snakemake(ws))
        after = _stamp(ws, params)
        assert _ran(before, after) == expected, what
        if what.startswith("train.stages.16"):
            _check_reused_stages_are_linked(ws, params)
    plan = _check(_snakemake(ws, "-n"))
    assert "Nothing to be done" in plan
    _check_offline(ws)
    assert "once the weights are there, `snakemake --cores all --forcerun fid_stats` re-makes the statistics" in (
        ws / "logs/fid-stats_16.log").read_text()
    # the weights arrive: nothing re-runs by itself (where they are is no param); the README's command
    _weights_arrive(ws, inception_weights)
    assert "Nothing to be done" in _check(_snakemake(ws, "-n"))
    _check(_snakemake(ws, "--forcerun", "fid_stats"))
    before, after = after, _stamp(ws, params)
    assert _ran(before, after) == AFTER_WEIGHTS
    _check_inception_numbers(ws, params)


@pytest.mark.xdist_group("e2e_dvc")
def test_dvc_full_run_then_only_what_changed(tmp_path, image_server, inception_weights):
    ws, params = _workspace(tmp_path, image_server, inception_weights)
    _check(_dvc(ws, "init", "--no-scm", "-q"))
    before = _stamp(ws, params)
    _check(_dvc(ws, "repro"))
    after = _stamp(ws, params)
    assert _ran(before, after) == ALL
    for what, value, _, expected in CASES:
        _apply(ws, what, value)
        before = after
        _check(_dvc(ws, "repro"))
        after = _stamp(ws, params)
        assert _ran(before, after) == expected, what
    status = _check(_dvc(ws, "status"))
    assert "Data and pipelines are up to date" in status
    metrics = _check(_dvc(ws, "metrics", "show"))
    for r in RES:
        assert paths.eval_metrics_json(r) in metrics and paths.train_metrics_json(r) in metrics
        assert f"swd_avg_r{r}" in metrics and f"d_loss_r{r}" in metrics
    assert "eval.json" not in metrics.replace("eval_metrics.json", "")      # the full records are plain outputs
    _check_offline(ws)
    # the weights arrive: nothing re-runs by itself (where they are is no param); the README's command
    _weights_arrive(ws, inception_weights)
    assert "Data and pipelines are up to date" in _check(_dvc(ws, "status"))
    out = _check(_dvc(ws, "repro", "--force", "--downstream", "fid-stats"))
    before, after = after, _stamp(ws, params)
    assert _ran(before, after) == AFTER_WEIGHTS, out[-3000:]
    results = _check_inception_numbers(ws, params)
    shown = json.loads(_check(_dvc(ws, "metrics", "show", "--json")))
    by_file = next(iter(shown.values()))["data"]
    assert by_file[paths.eval_metrics_json(16)]["data"][f"{FID_KEY}_r16"] == pytest.approx(results[16][FID_KEY])
    assert f"{FID_KEY}_r4" not in by_file[paths.eval_metrics_json(4)]["data"]


# ---- issue #16: change crop.size, and both front ends just work -------------------------------------------------

def _crop_size_workspace(tmp_path: Path) -> tuple[Path, object]:
    """A checkout as committed for crop.size 32 (its dvc.yaml generated for 4..32), in which the user edits
    params.yaml to crop.size 16 and drops train.stages.32, and nothing else."""
    ws = make_workspace(tmp_path / "ws")
    tiny_params(ws, size_px=32, data__max_images=24, evaluate__num_images=16, evaluate__msssim_pairs=4,
                mlflow__tracking_uri="sqlite:////proc/progan-no-mlflow/mlflow.db",     # not what this is about
                train__stages={str(r): {"batch": 8, "lr": 0.001, "transition_kimg": 0 if r == 4 else 0.05,
                                        "stabilize_kimg": 0.05} for r in (4, 8, 16, 32)})
    (ws / "dvc.yaml").write_text(pipeline.dvc_yaml(params_mod.load(ws / "params.yaml")))
    data = yaml.safe_load((ws / "params.yaml").read_text())
    data["crop"]["size"] = 16
    del data["train"]["stages"]["32"]
    (ws / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return ws, params_mod.load(ws / "params.yaml")


def _check_ran_at_16(ws: Path, params) -> None:
    assert all((ws / p).exists() for j in pipeline.jobs(params) for p in j.out_paths)
    assert not (ws / paths.stage_dir(32)).exists() and not (ws / paths.pyramid_level(32)).exists()
    assert (ws / "dvc.yaml").read_text() == pipeline.dvc_yaml(params)


@pytest.mark.xdist_group("crop_size_snakemake")
def test_crop_size_edit_then_snakemake(tmp_path):
    ws, params = _crop_size_workspace(tmp_path)
    out = _check(_snakemake(ws))
    assert "dvc.yaml did not match params.yaml (crop.size 16, train.start_px 4: stages 4, 8, 16): rewrote it" in out
    _check_ran_at_16(ws, params)


@pytest.mark.xdist_group("crop_size_dvc")
def test_crop_size_edit_then_dvc_repro(tmp_path):
    """DVC plans a run from dvc.yaml before any stage runs, and its templates cannot derive the stage list from
    params.yaml (pipeline.py explains why): the first stage command sees the stale file, rewrites it and stops with
    one line saying to run `dvc repro` again, before any work; the second `dvc repro` runs the 16 px pipeline."""
    ws, params = _crop_size_workspace(tmp_path)
    _check(_dvc(ws, "init", "--no-scm", "-q"))
    first = _dvc(ws, "repro")
    assert first.returncode != 0
    assert ("error: dvc.yaml did not match params.yaml (its stages follow crop.size, train.start_px, "
            "evaluate.metrics, evaluate.fid.min_res_px) and DVC had planned this run "
            "from the old one; it is rewritten now: run the same dvc command again") in first.stderr
    assert not (ws / "data").exists() and (ws / "dvc.yaml").read_text() == pipeline.dvc_yaml(params)
    _check(_dvc(ws, "repro"))
    _check_ran_at_16(ws, params)
    assert "Data and pipelines are up to date" in _check(_dvc(ws, "status"))
