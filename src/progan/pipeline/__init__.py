"""The stage table: every stage of the DAG declared once, in `STAGES`; everything else is derived from it.

The package, by job:
  stage.py         the data model: a `Stage` (its fields say what the front ends, the CLI, tracking and the report
                   need to know), its outputs (`Out`, `Report`), a `Job` (a stage at one resolution)
  placeholders.py  the placeholders of paths and params keys ({res}, {prev}, {final}, {each}, {level}) and
                   `OptionalDep`, filled per job
  this file        the table, STAGES, and its jobs (`job`, `jobs`, `edges`, ...)
  dvcfile.py       dvc.yaml, written from the table (why it is generated, not a DVC template: see there)

Derived from STAGES (no second list anywhere):
  Snakemake  workflow/rules/stages.smk: one rule per stage: inputs, outputs, params values, gpu resource, log, shell;
             the outputs with a `report` go in `snakemake --report` (category, caption workflow/report/*.rst)
  DVC        dvc.yaml, written by `dvc_yaml` (dvcfile.py)
  CLI        progan.cli's stage commands (help, --res) and gpus.GPU_COMMANDS
  tracking   which jobs log MLflow child runs, and the files a finished job attaches (`artifacts`)
  report     the command that makes a missing input (`command`)

Adding a stage touches three files: this one (a `Stage` in STAGES), its module (`run(params, ...)`, with
`res` and `lease` arguments when it is per-resolution or uses a GPU) and paths.py (the names of its outputs); plus
its tests. dvc.yaml follows by itself (dvcfile.py; `progan dvc-yaml` rewrites it at once).
"""
from __future__ import annotations

from pathlib import Path

from progan import paths
from progan.pipeline.placeholders import EACH, FINAL, INIT, LEVEL, PREV, RES, OptionalDep, fill, template, tokens
from progan.pipeline.stage import WHOLE_PARAMS_YAML, Job, Out, Report, Stage

# The params that decide which jobs the DAG has (not what a job computes): a change rewrites dvc.yaml.
DAG_SHAPE_KEYS = ("crop.size", "train.start_px", "evaluate.metrics", "evaluate.fid.min_res_px")

# ---- the table ------------------------------------------------------------------------------------------------

# Source files each stage runs, relative to the repository root. Shared plumbing (cli, params, paths, fileio, log,
# errors, tracking) is left out on purpose: a change there would re-run the whole DAG.
_MODEL = ("src/progan/model/layers.py", "src/progan/model/networks.py", "src/progan/checkpoint.py",
          "src/progan/pictures.py")
_TRAIN_KEYS = ("seed", "model", "crop.size", "train.gpus", "train.start_px", "train.init_from", "train.tick_kimg",
               "train.loss", "train.d_repeats", "train.gp_weight", "train.gp_target", "train.lr_rampup_kimg",
               "train.gp_resolution", "train.drift_weight", "train.betas", "train.adam_eps",
               "train.reset_opt_each_phase", "train.ema_decay", "train.mirror_augment", "train.max_consecutive_skips",
               "train.deterministic", "train.amp", "train.channels_last",
               "report.grid_images")      # samples.png shows G_ema on that many latents

_INCEPTION = tuple(f"src/progan/metrics/{m}.py" for m in ("__init__", "inception", "fid", "real_stats"))
# evaluate.* but the two keys that say where the Inception weights are: the file is pinned by sha256 (a code dep,
# metrics/inception.py), so moving it re-runs nothing (README: what to run when the weights arrive after a run
# made without them).
_EVALUATE_KEYS = tuple(f"evaluate.{k}" for k in (
    "num_images", "swd_descriptors_per_image", "swd_directions", "swd_repeats", "msssim_pairs", "batch", "seed",
    "metrics", "fid.num_images", "fid.max_reals", "fid.min_res_px", "fid.batch", "fid.kid_subsets",
    "fid.kid_subset_size", "fid.is_splits"))
INCEPTION_METRICS = ("fid", "kid", "is")        # the metrics that need the reals' statistics (metrics/registry.py)


def _inception_resolutions(params) -> list[int]:
    """fid-stats runs at the resolutions >= evaluate.fid.min_res_px, when evaluate.metrics has fid, kid or is."""
    if not set(params.evaluate.metrics) & set(INCEPTION_METRICS):
        return []
    return [r for r in params.resolutions if r >= int(params.evaluate.fid.min_res_px)]


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("download", "progan.data.download", "fetch or list the source images (data.*) into data/raw/",
          code=("src/progan/data/download.py", "src/progan/data/archive.py", "src/progan/data/transfer.py",
                "src/progan/data/cifar10.py", "src/progan/data/lsun.py"),
          outs=(Out(paths.IMAGES_LIST),),
          params=("data.source", "data.url", "data.sha256", "data.md5", "data.folder", "data.max_images",
                  "data.max_download_mb", "data.cifar10_split", "data.lsun_category")),
    Stage("crop", "progan.data.faces", "detect and crop one face per image (crop.*) into data/faces/",
          deps=(paths.IMAGES_LIST,),
          code=("src/progan/data/faces.py", "src/progan/data/mtcnn.py", "src/progan/data/images.py",
                "src/progan/data/readahead.py"),
          outs=(Out(paths.FACES_DIR, "uncached", folder=True),),
          params=("crop.detector", "crop.size", "crop.min_confidence", "crop.min_face_px", "crop.margin",
                  "crop.min_input_px", "crop.min_kept_fraction", "crop.max_image_pixels", "crop.batch_images"),
          gpu="one"),
    Stage("pyramid", "progan.data.pyramid", "write data/pyramid/<res>.npy for every resolution 4 .. crop.size",
          deps=(paths.FACES_DIR,),
          code=("src/progan/data/pyramid.py",),
          outs=(Out(paths.pyramid_level(LEVEL), "uncached"), Out(paths.PYRAMID_INFO)),
          params=("crop.size", "pyramid.chunk_images")),
    Stage("fid-stats", "progan.metrics.real_stats",
          "the reals' Inception statistics of one pyramid level (FID, KID, IS): data/fid-stats/<res>.npz",
          per_res=True, runs_at=_inception_resolutions, gpu="one",
          deps=(paths.pyramid_level(RES),),
          code=_INCEPTION,
          outs=(Out(paths.fid_stats(RES), "uncached"),),        # up to ~410 MB at 50,000 reals: rebuilt, not cached
          params=("evaluate.fid.max_reals",)),                 # which reals; the rest of the file is code (the pin)
    Stage("train", "progan.train.loop", "train one growth stage: results/<res>/checkpoint.pt (train.*)",
          per_res=True, gpu="train.gpus", mlflow="train",
          deps=(INIT,                   # train.init_from: the first job's checkpoint to start from (first: DVC's `prev`)
                paths.checkpoint(PREV), paths.pyramid_level(RES)),
          code=_MODEL + ("src/progan/headline.py",) + tuple(f"src/progan/train/{m}.py" for m in
                              ("loop", "step", "nets", "loss", "nonfinite", "schedule", "state", "data", "dist")),
          outs=(Out(paths.checkpoint(RES), artifact=False),
                Out(paths.losses_tsv(RES), report=Report("Curves", "losses.rst")),
                Out(paths.samples_png(RES), report=Report("Samples", "samples.rst")),
                Out(paths.train_json(RES)),
                Out(paths.train_metrics_json(RES), "metrics", artifact=False)),
          params=_TRAIN_KEYS + ("train.stages.{res}",)),
    Stage("evaluate", "progan.evaluate",
          "the metrics of one stage (evaluate.metrics: SWD, MS-SSIM, FID, KID, IS): results/<res>/eval.json",
          per_res=True, gpu="one", mlflow="evaluate",
          deps=(paths.checkpoint(RES), paths.pyramid_level(RES),
                paths.PYRAMID_INFO,                            # the level's sha256 (eval.json; checks the stats file)
                OptionalDep(paths.fid_stats(RES))),
          code=_MODEL + ("src/progan/evaluate.py", "src/progan/headline.py", *(f"src/progan/metrics/{m}.py" for m in (
              "registry", "swd", "swd_reference", "msssim"))) + _INCEPTION,
          outs=(Out(paths.eval_json(RES), report=Report("Evaluation", "eval.rst")),
                Out(paths.eval_metrics_json(RES), "metrics", artifact=False)),
          params=_EVALUATE_KEYS + ("train.mirror_augment",)),  # the reals are mirrored when training's were
    Stage("report", "progan.report", "one HTML page for the whole run: results/report/index.html",
          deps=(paths.eval_json(EACH), paths.train_json(EACH), paths.losses_tsv(EACH), paths.samples_png(EACH),
                paths.checkpoint(FINAL), paths.pyramid_level(FINAL)),
          code=_MODEL + ("src/progan/api.py", "src/progan/headline.py", "src/progan/report/__init__.py",
                         "src/progan/report/html.py", "src/progan/report/plots.py"),
          outs=(Out(paths.REPORT_HTML, report=Report("Report", "report.rst")),
                Out(paths.REPORT_SWD_PLOT, "plots", plot={"x": "res_px", "y": ["swd_avg", "swd_real_vs_real_avg"]},
                    report=Report("Evaluation", "eval_table.rst")),
                Out(paths.REPORT_LOSS_PLOT, "plots", plot={"x": "total_kimg", "y": ["d_loss", "g_loss"]}),
                Out(paths.REPORT_LOSS_PNG, report=Report("Curves", "loss_curves.rst")),
                Out(paths.REPORT_SWD_PNG, report=Report("Curves", "swd_curves.rst"))),
          params=(WHOLE_PARAMS_YAML,)),      # the page shows every param of the run and their digest
]}


def gpu_stages() -> tuple[str, ...]:
    return tuple(name for name, s in STAGES.items() if s.gpu)


# ---- jobs -----------------------------------------------------------------------------------------------------

def made_paths(params) -> set[str]:
    """Every path a job of the table writes (outs only: no job's deps are needed for it)."""
    return {o.path for s in STAGES.values() for r in s.job_resolutions(params)
            for o in fill(s.outs, params, **tokens(params, r))}


def job(params, name: str, res: int | None = None, *, made: set[str] | None = None) -> Job:
    """The job of stage `name` at resolution `res` (None for a stage that is not per resolution). `made`: the paths
    the table's jobs write (made_paths), when the caller has them: an OptionalDep is one where they hold it."""
    s = STAGES[name]
    if s.per_res != (res is not None):
        raise ValueError(f"stage {name}: res={res!r}, but it is {'' if s.per_res else 'not '}per resolution")
    if s.per_res and res not in s.resolutions(params):
        raise ValueError(f"stage {name} has no job at {res} px (it runs at {s.resolutions(params)})")
    job_tokens = tokens(params, res)
    deps = fill(s.deps, params, **job_tokens)
    if any(isinstance(d, OptionalDep) for d in deps):
        made = made_paths(params) if made is None else made
        deps = [template(d) for d in deps if not isinstance(d, OptionalDep) or d.path in made]
    return Job(s, res, deps, fill(s.outs, params, **job_tokens), fill(s.params, params, **job_tokens), list(s.code))


def jobs(params) -> list[Job]:
    """Every job of the DAG, in a valid order (the table's, each per-resolution stage at its resolutions in order:
    4, 8, ..., crop.size, or those of `Stage.runs_at`)."""
    made = made_paths(params)          # once for all the jobs, not once per job with an OptionalDep
    return [job(params, name, r, made=made) for name, s in STAGES.items() for r in s.job_resolutions(params)]


def edges(params) -> set[tuple[str, str]]:
    """(producer id, consumer id) pairs, derived from deps and outs (what both tools should report)."""
    all_jobs = jobs(params)
    producer = {out: j.id for j in all_jobs for out in j.out_paths}
    return {(producer[d], j.id) for j in all_jobs for d in j.deps if d in producer}


def output_patterns(params, name: str, res_token: str = "{res}") -> list[Out]:
    """The outputs of stage `name` with {res} left as `res_token` (Snakemake's wildcard, DVC's ${key})."""
    s = STAGES[name]
    return fill(s.outs, params, res=res_token if s.per_res else None, final=params.crop.size)


def report_subcategory(name: str, res: int | str | None = None) -> str:
    """The subcategory of a job's files in Snakemake's report: `stage 3: 16 px` for a per-resolution stage (the
    report sorts names as text: the stage number keeps them in growth order, 4 px to 1024 px = stage 1 to 9), or
    `all stages`."""
    if not STAGES[name].per_res:
        return "all stages"
    return f"stage {int(res).bit_length() - 2}: {res} px"


def command(name: str, res: int | None = None) -> str:
    return STAGES[name].command(res)


def artifacts(params, name: str, res: int | None = None) -> list[str]:
    """The files a finished job of stage `name` attaches to its MLflow run."""
    return [o.path for o in job(params, name, res).outs if o.artifact]


def mlflow_jobs() -> tuple[str, ...]:
    """The MLflow job names of the stages that log a child run (progan.tracking.stage_run's `job`)."""
    return tuple(s.mlflow for s in STAGES.values() if s.mlflow)


def mlflow_artifacts(params, mlflow_job: str, res: int) -> list[str]:
    """The files a finished MLflow job (`train`, `evaluate`) attaches to the stage's child run."""
    return [p for name, s in STAGES.items() if s.mlflow == mlflow_job for p in artifacts(params, name, res)]

def repo_root() -> Path:
    """The checkout that holds Snakefile and dvc.yaml (src/progan/pipeline/__init__.py -> ../../../)."""
    return Path(__file__).resolve().parents[3]


# dvc.yaml's entry points, beside the table's (dvcfile.py reads STAGES above, so it is imported last)
from progan.pipeline.dvcfile import dvc_yaml, sync_dvc_yaml, under_dvc  # noqa: E402,F401
