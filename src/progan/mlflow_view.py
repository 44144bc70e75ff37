"""How the MLflow 3 UI shows our experiment: as model training (runs), not as a GenAI app (traces), with a saved view
of the runs table whose columns are the SWD of every stage. Experiment tags only; progan.tracking sets them.

- `mlflow.experimentKind` = `custom_model_development`: the experiment kind MLflow 3's UI reads (the installed
  mlflow's server/js build, enum ExperimentKind: GENAI_DEVELOPMENT "genai_development", CUSTOM_MODEL_DEVELOPMENT
  "custom_model_development", and the same with "_inferred" when the UI guessed; mlflow/demo/generators/traces.py
  sets the GenAI value the same way). A kind the UI only inferred is replaced, one a person chose is kept.
- Since mlflow/mlflow#20161 (checked in the installed 3.17.2, headless Chromium) the page an experiment opens on
  follows the sidebar's GenAI / Model training switch (`workflowType`: the browser's localStorage, GenAI by default), not the
  tag: a fresh browser opens our experiment on the GenAI overview ("Traces", "Detect issues"). `runs_url` is the
  link that opens the runs whatever the switch says (`?workflowType=machine_learning`), on the saved view below.
- The saved view: experiment tag `mlflow.sharedViewState.<VIEW_ID>` = {"name", "createdAt", "updatedAt",
  "state": the runs table's UI state as JSON}, what the UI's *Views* menu stores (mlflow/demo/generators/
  saved_views.py seeds the traces' views the same way); `viewStateShareKey=<VIEW_ID>` in the URL applies it. Its
  columns: swd_avg_r<R> for every stage, in growth order (the metrics the report logs to the parent run,
  progan.headline); the stage runs are nested under their parent (tag mlflow.parentRunId: the expander on its row).
"""
from __future__ import annotations

import json
import time

KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
VIEW_ID = "progan-stages"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"
VIEW_NAME = "progan: SWD per stage"
LOCAL_UI = "http://127.0.0.1:5000"          # where `mlflow ui` listens by default


def view_columns(params) -> list[str]:
    """The runs table's columns in the saved view: `metrics.`swd_avg_r4``, ... (the UI's column keys)."""
    return [f"metrics.`swd_avg_r{r}`" for r in params.resolutions]


def _view_state(params) -> dict:
    columns = view_columns(params)
    return {"selectedColumns": columns, "columnOrder": columns}


def tags_to_set(params, current: dict[str, str], now_ms: int | None = None) -> dict[str, str]:
    """The experiment tags that differ from what the experiment has (`current`): usually none."""
    out = {}
    kind = current.get(KIND_TAG)
    if not kind or kind.endswith("_inferred"):
        out[KIND_TAG] = TRAINING_KIND
    state = _view_state(params)
    try:
        old = json.loads(current[VIEW_TAG])
        same = json.loads(old["state"]) == state and old.get("name") == VIEW_NAME
        created = int(old["createdAt"])
    except (KeyError, TypeError, ValueError):
        same, created = False, None
    if not same:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        out[VIEW_TAG] = json.dumps({"name": VIEW_NAME, "createdAt": created or now_ms, "updatedAt": now_ms,
                                    "state": json.dumps(state)})
    return out


def runs_url(tracking_uri: str, experiment_id: str) -> str:
    """The UI page of the experiment's runs, on the saved view: on the tracking server itself when the store is
    one (http[s]://), else where `mlflow ui` listens by default."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_ID}"
