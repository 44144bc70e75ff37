# Helpers shared by the rules: params (validated before any work), the rules' parts from the stage table
# (src/progan/pipeline/), GPU counts, MLflow.
import functools
import json
import os

from snakemake.exceptions import WorkflowError

from progan import gpus, log as progan_log, paths, pipeline, workspace
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
progan_log.setup()
pipeline.sync_dvc_yaml(PARAMS)  # a generated dvc.yaml follows params.yaml (crop.size sets its stages)


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
    return f"{gpus.REQUEST_ENV}={{resources.gpu}} " + pipeline.command(name, "{wildcards.res}" if per_res else None)


def stage_code(name):
    """Source files a stage runs, as absolute paths into the checkout (inputs: edits re-run the stage)."""
    return [str(REPO / f) for f in pipeline.STAGES[name].code]


def _job(stage, wildcards):
    return pipeline.job(PARAMS, stage.name, int(wildcards.res) if stage.per_res else None)


def stage_inputs(stage):
    """The job's inputs by wildcard: {"data": what it reads, "code": the source files it runs}."""

    def get(wildcards):
        return {"data": _job(stage, wildcards).deps, "code": stage_code(stage.name)}

    return get


def stage_outputs(stage):
    """The stage's outputs, with the wildcard {res} in those of a per-resolution stage; folders as directory();
    those with a `report` (pipeline.Out) marked for `snakemake --report`: category, caption workflow/report/*.rst
    (relative to this rule file's folder), a subcategory per stage."""

    def subcategory(wildcards):
        return pipeline.report_subcategory(stage.name, wildcards.get("res"))

    def labels(name):
        return lambda wildcards: {"stage": subcategory(wildcards), "file": name}

    outs = []
    for o in pipeline.output_patterns(PARAMS, stage.name):
        path = directory(o.path) if o.folder else o.path
        if o.report is not None:
            path = report(path, caption=f"../report/{o.report.caption}", category=o.report.category,
                          subcategory=subcategory, labels=labels(Path(o.path).name))
        outs.append(path)
    return outs


def stage_params(stage):
    """Params values the job reads, by wildcard (so only its own keys count: editing train.stages.64 re-runs
    stage 64 and what follows)."""

    def get(wildcards):
        return PARAMS.subset(_job(stage, wildcards).params)

    return get


def stage_resources(stage):
    return {"gpu": stage_gpus(stage.name)} if stage.gpu else {}


def stage_log(stage):
    return f"logs/{stage.name}" + ("_{res}" if stage.per_res else "") + ".log"


def stage_shell(stage):
    cmd = gpu_shell(stage.name, stage.per_res) if stage.gpu else pipeline.command(
        stage.name, "{wildcards.res}" if stage.per_res else None)
    return cmd + " 2>&1 | tee {log}"


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
