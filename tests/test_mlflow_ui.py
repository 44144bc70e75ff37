"""The MLflow UI of the installed mlflow, in headless Chromium against a real `mlflow ui` on 127.0.0.1: the link the
pipeline prints (progan.mlflow_view.runs_url) opens on the training runs, not on the GenAI overview, with the SWD of
every stage as columns of the parent run and the stage runs nested under it."""
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from progan import mlflow_view, params as params_mod, tracking

from helpers import tiny_params, tool_env
from test_report import CHROMIUM

pytestmark = pytest.mark.skipif(CHROMIUM is None and not __import__("os").environ.get("CI"),
                                reason="chromium not installed (CI installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store(tmp_path, monkeypatch, capsys):
    """Two pipeline invocations of a 3-stage run (4, 8, 16 px), logged through progan.tracking."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    p = params_mod.load(tiny_params(tmp_path / "proj", size_px=16, mlflow__experiment="progan-ui"))
    for run in range(2):
        tracking.run(p)
        for r in p.resolutions:
            with tracking.stage_run(p, r, "train") as t:
                t.log_metrics({"d_loss": 1.0, "g_loss": 2.0}, r / 1000)
        tracking.log_pipeline_summary(p, {f"swd_avg_r{r}": 100.0 + 10 * run + r for r in p.resolutions}, [])
        (p.root / tracking.PARENT_FILE).unlink()          # the next invocation is a new parent
    capsys.readouterr()
    return p


def test_runs_link_opens_on_training_runs_with_swd_columns(store, tmp_path):
    assert CHROMIUM, "CI must have chromium"
    uri = tracking.tracking_uri(store)
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port)], env=tool_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise AssertionError(f"mlflow ui did not start on {base}")
                time.sleep(0.5)
        from mlflow import MlflowClient

        exp = MlflowClient(uri).get_experiment_by_name("progan-ui")
        url = mlflow_view.runs_url(uri, exp.experiment_id).replace(mlflow_view.LOCAL_UI, base)
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1800,900",
                              "--virtual-time-budget=30000", "--dump-dom", url],
                             capture_output=True, text=True, timeout=180).stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "Detect Issues" not in dom and "Observability" not in dom          # not the GenAI overview
    assert ">Runs<" in dom and mlflow_view.VIEW_NAME in dom                   # the runs table, on our view
    headers = re.findall(r'role="columnheader"[^>]*col-id="metrics\.`(\w+)`"[^>]*left: (\d+)px', dom)
    shown = [name for name, left in sorted(set(headers), key=lambda h: int(h[1]))]
    assert shown == [f"swd_avg_r{r}" for r in store.resolutions]                # the columns, in growth order
    assert "116" in dom and "126" in dom                                       # both parents' swd_avg_r16
    # 2 parents + 3 stage runs each match, but only the parents are rows: the stages are nested under them
    assert re.search(r"<strong>8</strong> matching runs", dom), re.findall(r".{80}matching runs", dom)
    assert dom.count(">pipeline ") == 2 and "stage 4px" not in dom
