# Helpers shared by the rules: params (validated before any work), the stage table, GPU counts, MLflow.
import functools
import json
import os

from snakemake.exceptions import WorkflowError

from progan import gpus, paths, pipeline, workspace
from progan import params as progan_params
from progan.errors import ProganError

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

try:
    PARAMS = progan_params.load("params.yaml")
except ProganError as err:
    raise WorkflowError(str(err)) from None
if json.loads(json.dumps(config)) != PARAMS.to_dict():
    raise WorkflowError(
        "params.yaml is the only config: do not pass --config/--configfile; edit params.yaml instead"
    )


def _gpu_budget():
    res = workflow.global_resources.get("gpu")
    value = getattr(res, "value", res)
    return None if value is None else int(value)


GPU_BUDGET = _gpu_budget()
if GPU_BUDGET is not None:
    os.environ[gpus.BUDGET_ENV] = str(GPU_BUDGET)  # jobs resolve train.gpus=auto the same way
try:
    gpus.requested("train", PARAMS, GPU_BUDGET, 0)  # an explicit train.gpus above the budget fails here, at once
except ProganError as err:
    raise WorkflowError(str(err)) from None


def _jobs_run_here():
    """False under a cluster executor (jobs run on other machines), and inside such a job on its node:
    then the devices of this machine say nothing about the job's (see gpus.requested)."""
    return workflow.local_exec and not workflow.remote_exec


@functools.lru_cache(maxsize=1)
def _visible_here():
    return len(gpus.visible_devices())


def stage_gpus(name):
    """The rule's `gpu` resource: from params and the --resources gpu budget; this machine's devices count
    only when the jobs run here. Evaluated per job, when Snakemake knows its executor."""

    def get(wildcards):
        return gpus.requested(name, PARAMS, GPU_BUDGET, _visible_here() if _jobs_run_here() else None)

    return get


def gpu_shell(name, per_res=False):
    """A GPU rule's command: tells the job what it asked for, so it can say when it got less."""
    return f"{gpus.REQUEST_ENV}={{resources.gpu}} " + stage_shell(name, per_res)


def stage_code(name):
    """Source files a stage runs, as absolute paths into the checkout (inputs: edits re-run the stage)."""
    return [str(REPO / f) for f in pipeline.SOURCES[name]]


def stage_shell(name, per_res=False):
    return pipeline.stage(PARAMS, name, 4 if per_res else None).cmd.replace("--res 4", "--res {wildcards.res}")


def stage_params(name):
    return PARAMS.subset(pipeline.stage(PARAMS, name, 4 if name in ("train", "evaluate") else None).params)


def res_params(name):
    """Params values a per-resolution job reads, by wildcard (so only that stage's keys count)."""

    def get(wildcards):
        return PARAMS.subset(pipeline.stage(PARAMS, name, int(wildcards.res)).params)

    return get


def res_inputs(name):
    def get(wildcards):
        s = pipeline.stage(PARAMS, name, int(wildcards.res))
        return {"data": s.deps, "code": stage_code(name)}

    return get


onstart:
    # Refuse while DVC works on this workspace; our jobs carry PROGAN_DRIVER so they pass the reverse check.
    try:
        workspace.check_for_snakemake(Path.cwd())
    except ProganError as err:
        raise WorkflowError(str(err)) from None
    os.environ[workspace.DRIVER_ENV] = "snakemake"
    # One MLflow parent run per invocation, created (with the SQLite store) before any job starts:
    # a fresh mlflow.db opened by several jobs at once gets corrupted.
    shell("progan track-start --params params.yaml")
    state = Path(paths.STATE_DIR) / "mlflow_parent.json"
    if state.exists():
        os.environ["PROGAN_MLFLOW_PARENT_RUN_ID"] = json.loads(state.read_text())["run_id"]
