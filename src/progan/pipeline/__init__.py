"""The stage table: every stage of the DAG declared once, in `STAGES`; everything else is derived from it.

A `Stage` holds what the front ends, the CLI, tracking and the report need to know:
  name     the command (`progan <name>`), the DVC stage (`<name>`, `<name>@<R>`) and the Snakemake rule ('-' -> '_')
  module   where its `run(params, ...)` lives (and, optionally, `add_arguments(parser)` for extra flags)
  help     its line in `progan --help`
  per_res  one job per training resolution: `--res R`, the Snakemake wildcard {res}, a DVC `foreach` group
  at       for a per-resolution stage that runs at only some of them: a function of params giving those (fid-stats:
           the resolutions >= evaluate.fid.min_res_px, none when evaluate.metrics has no fid, kid or is); the keys
           it reads are DAG_SHAPE_KEYS
  deps     the data it reads; `code`: the source files it runs (an edit re-runs it); both are its inputs. A dep
           wrapped in `IfMade` is one only where a job of the table makes it (evaluate@R reads the reals'
           statistics where fid-stats@R runs)
  outs     what it writes, each an `Out` with its kind: plain, uncached (big, cheap to rebuild: DVC does not copy
           it into its cache), metrics (the few numbers people compare: progan.headline) or plots (DVC), folder
           or file, attached to its MLflow run or not, shown in Snakemake's report or not
  params   the dotted params.yaml keys it reads (tests/test_params_read.py records what `run()` reads and checks
           this list against it), so that editing a key re-runs exactly the stages that read it; ALL_PARAMS: all
  gpu      None (CPU only), "one" (one GPU when there is one) or a params key ("train.gpus": as many as it says,
           several = torchrun); progan.gpus turns it into the job's `gpu` resource and its lease
  mlflow   the job name of the MLflow child run it logs into (train and evaluate of a stage share one), or None
Paths and keys may hold placeholders, filled per job: {res} the job's resolution; {prev} the one before it (an
entry with {prev} is left out of the first training job, at train.start_px: it starts from scratch); {final}
crop.size; {each} every training resolution (consecutive {each} entries are repeated together for train.start_px,
..., crop.size); {level} every pyramid level, 4, 8, ..., crop.size (data does not depend on where training starts).
So `train.start_px: <crop.size>` (the official -nogrowing) is one train and one evaluate job, the train job reading
the pyramid level alone, in both front ends; nothing else changes.

Derived from STAGES (no second list anywhere):
  Snakemake  workflow/rules/stages.smk: one rule per stage: inputs, outputs, params values, gpu resource, log, shell;
             the outputs with a `report` go in `snakemake --report` (category, caption workflow/report/*.rst)
  DVC        dvc.yaml, written by `dvc_yaml` (see below)
  CLI        progan.cli's stage commands (help, --res) and gpus.GPU_COMMANDS
  tracking   which jobs log MLflow child runs, and the files a finished job attaches (`artifacts`)
  report     the command that makes a missing input (`command`)

Adding a stage touches three files: this one (a `Stage` in STAGES), its module (`run(params, ...)`, with
`res` and `lease` arguments when it is per-resolution or uses a GPU) and paths.py (the names of its outputs); plus
its tests. dvc.yaml follows by itself (see below; `progan dvc-yaml` rewrites it at once).

dvc.yaml is generated, not a DVC template: DVC's templating (params.yaml as vars, `foreach` over train.stages,
`${key}` / `${item}`) has no arithmetic and no nested interpolation (`${prev.${key}}` does not parse; a `foreach`
item cannot refer to the previous item: treeverse/dvc#5167, #10627), so train@R cannot name the R/2 checkpoint and
the report cannot list every stage's files. `dvc_yaml(params)` writes the stages of params.yaml's resolutions, and
`sync_dvc_yaml` rewrites a generated dvc.yaml that no longer matches params.yaml: the Snakefile and every `progan`
stage command call it, so after editing crop.size or train.start_px (or another of DAG_SHAPE_KEYS) nothing needs
regenerating by hand. Under `dvc repro` the first stage command that finds it stale rewrites it and stops with one
line saying to run `dvc repro` again (DVC has already planned the run from the old file).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from progan import paths

RES, PREV, FINAL, EACH, LEVEL = "{res}", "{prev}", "{final}", "{each}", "{level}"
ALL_PARAMS = ""                    # as a params key: every key of params.yaml (DVC: `- params.yaml:`)
OUT_KINDS = ("plain", "uncached", "metrics", "plots")
# The params that decide which jobs the DAG has (not what a job computes): a change rewrites dvc.yaml.
DAG_SHAPE_KEYS = ("crop.size", "train.start_px", "evaluate.metrics", "evaluate.fid.min_res_px")
REPORT_CATEGORIES = ("Samples", "Curves", "Evaluation", "Report")    # Snakemake's report, by what a file is


@dataclass(frozen=True)
class Report:
    """Where Snakemake's own report (`snakemake --report report.zip`) shows an output: its category (what it is:
    one of REPORT_CATEGORIES) and its caption, workflow/report/<caption> (reStructuredText). The files of a
    per-resolution stage go in one subcategory per stage (`report_subcategory`)."""
    category: str
    caption: str

    def __post_init__(self):
        if self.category not in REPORT_CATEGORIES:
            raise ValueError(f"Report {self.caption}: category must be one of {REPORT_CATEGORIES}, "
                             f"got {self.category!r}")


@dataclass(frozen=True)
class Out:
    """An output of a stage. Its `kind` is what DVC makes of it: `dvc exp show` has a column per key of every
    metrics file, so the metrics files are the small per-stage ones of progan.headline (what people compare), and
    the full records (train.json, eval.json) are plain outputs. `report` puts it in Snakemake's report (stages.smk
    applies it where it lists the outputs)."""
    path: str
    kind: str = "plain"            # plain | uncached | metrics | plots
    folder: bool = False           # a directory (Snakemake `directory()`)
    artifact: bool = True          # attached to the job's MLflow run when it finishes (when it has one)
    plot: dict | None = None       # plots: the axes `dvc plots show` draws ({"x": column, "y": [columns]})
    report: Report | None = None   # shown in `snakemake --report`, with this category and caption

    def __post_init__(self):
        if self.kind not in OUT_KINDS:
            raise ValueError(f"Out {self.path}: kind must be one of {OUT_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class IfMade:
    """A dep that a job has only where some job of the table makes it (evaluate@R's data/fid-stats/R.npz: only where
    fid-stats@R runs). DVC gets it per item of the foreach group (`${item.<producer's rule>}`)."""
    path: str


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    help: str
    deps: tuple[str | IfMade, ...] = ()
    code: tuple[str, ...] = ()
    outs: tuple[Out, ...] = ()
    params: tuple[str, ...] = ()
    per_res: bool = False
    at: Callable[[object], list[int]] | None = None     # per_res: the resolutions it runs at (None: all of them)
    gpu: str | None = None
    mlflow: str | None = None

    def resolutions(self, params) -> list[int]:
        """The resolutions this per-resolution stage has a job at (a subset of params.resolutions, in order)."""
        if not self.per_res:
            raise ValueError(f"stage {self.name} is not per resolution")
        if self.at is None:
            return list(params.resolutions)
        chosen = set(self.at(params))
        return [r for r in params.resolutions if r in chosen]

    @property
    def rule(self) -> str:
        """The Snakemake rule name (a Python identifier)."""
        return self.name.replace("-", "_")

    def command(self, res="{res}") -> str:
        """The shell command of a job; `res` is its resolution, or a placeholder (Snakemake, DVC)."""
        return f"progan {self.name}" + (f" --res {res}" if self.per_res else "") + " --params params.yaml"


@dataclass(frozen=True)
class Job:
    """One job of the DAG: a stage at one resolution (or the one job of a stage that is not per resolution)."""
    stage: Stage
    res: int | None
    deps: list[str]
    outs: list[Out]
    params: list[str]
    code: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        """DVC's name for the job (`train@16` for foreach stages); Snakemake's is (rule, res)."""
        return self.stage.name if self.res is None else f"{self.stage.name}@{self.res}"

    @property
    def cmd(self) -> str:
        return self.stage.command(self.res)

    @property
    def out_paths(self) -> list[str]:
        return [o.path for o in self.outs]


# ---- the table ------------------------------------------------------------------------------------------------

# Source files each stage runs, relative to the repository root. Shared plumbing (cli, params, paths, fileio, log,
# errors, tracking) is left out on purpose: a change there would re-run the whole DAG.
_MODEL = ("src/progan/model/layers.py", "src/progan/model/networks.py", "src/progan/checkpoint.py",
          "src/progan/pictures.py")
_TRAIN_KEYS = ("seed", "model", "crop.size", "train.gpus", "train.start_px", "train.tick_kimg", "train.loss",
               "train.gp_weight",
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
          code=("src/progan/data/download.py", "src/progan/data/archive.py"),
          outs=(Out(paths.IMAGES_LIST),),
          params=("data.source", "data.url", "data.sha256", "data.md5", "data.folder", "data.max_images",
                  "data.max_download_mb")),
    Stage("crop", "progan.data.faces", "detect and crop one face per image (crop.*) into data/faces/",
          deps=(paths.IMAGES_LIST,),
          code=("src/progan/data/faces.py", "src/progan/data/mtcnn.py", "src/progan/data/images.py"),
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
          per_res=True, at=_inception_resolutions, gpu="one",
          deps=(paths.pyramid_level(RES),),
          code=_INCEPTION,
          outs=(Out(paths.fid_stats(RES), "uncached"),),        # up to ~410 MB at 50,000 reals: rebuilt, not cached
          params=("evaluate.fid.max_reals",)),                 # which reals; the rest of the file is code (the pin)
    Stage("train", "progan.train.loop", "train one growth stage: results/<res>/checkpoint.pt (train.*)",
          per_res=True, gpu="train.gpus", mlflow="train",
          deps=(paths.checkpoint(PREV), paths.pyramid_level(RES)),
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
                IfMade(paths.fid_stats(RES))),
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
          params=(ALL_PARAMS,)),      # the page shows every param of the run and their digest
]}


def gpu_stages() -> tuple[str, ...]:
    return tuple(name for name, s in STAGES.items() if s.gpu)


# ---- jobs -----------------------------------------------------------------------------------------------------

def _fill(entries, params, *, res=None, prev=None, final=None, path=lambda e: e, put=lambda e, p: p) -> list:
    """The entries with their placeholders filled (see the module docstring); `path` reads an entry's template and
    `put` makes the filled entry (for Out). An entry with {prev} is left out when prev is None."""
    out, group = [], []
    over = {EACH: params.resolutions, LEVEL: params.levels}       # what {each} and {level} repeat over

    def fill(e, each=None):
        text = path(e)
        if RES in text and res is None:
            raise ValueError(f"{text}: {RES} in a stage that is not per resolution")
        return put(e, text.format(res=res, prev=prev, final=final, each=each, level=each))

    def flush():
        if group:
            out.extend(fill(e, r) for r in over[group[0][0]] for _, e in group)
        group.clear()

    for e in entries:
        token = EACH if EACH in path(e) else LEVEL if LEVEL in path(e) else None
        if token is not None:
            if group and group[0][0] != token:
                flush()
            group.append((token, e))
            continue
        flush()
        if PREV not in path(e) or prev is not None:
            out.append(fill(e))
    flush()
    return out


def _fill_outs(outs, params, **tokens) -> list[Out]:
    return _fill(outs, params, path=lambda o: o.path, put=lambda o, p: dataclasses.replace(o, path=p), **tokens)


def _dep_path(d) -> str:
    return d.path if isinstance(d, IfMade) else d


def _made(params) -> set[str]:
    """Every path a job of the table writes (outs only: no job's deps are needed for it)."""
    made = set()
    for s in STAGES.values():
        for r in (s.resolutions(params) if s.per_res else [None]):
            made.update(o.path for o in _fill_outs(s.outs, params, **_tokens(params, r)))
    return made


def prev_res(params, res: int) -> int | None:
    """The stage a training job at `res` grows from: res / 2, or None at train.start_px (from scratch)."""
    return res // 2 if res > params.start_px else None


def _tokens(params, res):
    return {"res": res, "prev": prev_res(params, res) if res is not None else None, "final": params.crop.size}


def job(params, name: str, res: int | None = None) -> Job:
    """The job of stage `name` at resolution `res` (None for a stage that is not per resolution)."""
    s = STAGES[name]
    if s.per_res != (res is not None):
        raise ValueError(f"stage {name}: res={res!r}, but it is {'' if s.per_res else 'not '}per resolution")
    if s.per_res and res not in s.resolutions(params):
        raise ValueError(f"stage {name} has no job at {res} px (it runs at {s.resolutions(params)})")
    tokens = _tokens(params, res)
    deps = _fill(s.deps, params, path=_dep_path, put=lambda d, p: IfMade(p) if isinstance(d, IfMade) else p,
                 **tokens)
    if any(isinstance(d, IfMade) for d in deps):
        made = _made(params)
        deps = [_dep_path(d) for d in deps if not isinstance(d, IfMade) or d.path in made]
    return Job(s, res, deps, _fill_outs(s.outs, params, **tokens), _fill(s.params, params, **tokens), list(s.code))


def jobs(params) -> list[Job]:
    """Every job of the DAG, in a valid order (the table's, each per-resolution stage at its resolutions in order:
    4, 8, ..., crop.size, or those of `Stage.at`)."""
    return [job(params, name, r) for name, s in STAGES.items()
            for r in (s.resolutions(params) if s.per_res else [None])]


def edges(params) -> set[tuple[str, str]]:
    """(producer id, consumer id) pairs, derived from deps and outs (what both tools should report)."""
    all_jobs = jobs(params)
    producer = {out: j.id for j in all_jobs for out in j.out_paths}
    return {(producer[d], j.id) for j in all_jobs for d in j.deps if d in producer}


def output_patterns(params, name: str, res_token: str = "{res}") -> list[Out]:
    """The outputs of stage `name` with {res} left as `res_token` (Snakemake's wildcard, DVC's ${key})."""
    s = STAGES[name]
    return _fill_outs(s.outs, params, res=res_token if s.per_res else None, final=params.crop.size)


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


# ---- dvc.yaml ---------------------------------------------------------------------------------------------------

DVC_HEADER = ("# GENERATED from src/progan/pipeline.py and params.yaml: do not edit by hand. It follows params.yaml\n"
              "# by itself (every `progan` stage command and the Snakefile rewrite it when crop.size, train.start_px,\n"
              "# evaluate.metrics or evaluate.fid.min_res_px change the stages); `progan dvc-yaml` rewrites it.\n")


def _dvc_entry(cmd: str, deps: list[str], params: list[str], outs: list[Out]) -> dict:
    entry: dict = {"cmd": cmd}
    if deps:
        entry["deps"] = list(dict.fromkeys(deps))
    if ALL_PARAMS in params:
        entry["params"] = [{"params.yaml": None}]
    elif params:
        entry["params"] = list(params)
    sections: dict[str, list] = {"outs": [], "metrics": [], "plots": []}
    for o in outs:
        if o.kind == "plain":
            sections["outs"].append(o.path)
        else:                                      # uncached outs, metrics and plots stay out of DVC's cache
            sections["outs" if o.kind == "uncached" else o.kind].append({o.path: {"cache": False}})
    entry.update({k: v for k, v in sections.items() if v})
    return entry


def _producer(template: str) -> Stage:
    """The per-resolution stage whose output pattern is `template` (an IfMade dep's)."""
    for s in STAGES.values():
        if s.per_res and template in (o.path for o in s.outs):
            return s
    raise ValueError(f"IfMade({template!r}): no per-resolution stage writes it")


def _foreach(params, s: Stage) -> dict:
    """A DVC `foreach` group for per-resolution stage `s`: the `do` template and the items, keyed by resolution
    (DVC names the jobs `train@16`). DVC cannot compute R/2, nor leave a dep out of one item, so a dep that varies
    between items (a {prev} dep, an IfMade one) becomes `${item.<name>}`, given per item (`prev`; an IfMade dep: the
    rule name of the stage that makes it); an item without it (the first training job, at train.start_px; evaluate@R
    below evaluate.fid.min_res_px) gets its first other dep there instead (DVC counts a dep once)."""
    own = s.resolutions(params)
    varying = {d: ("prev" if PREV in _dep_path(d) else _producer(_dep_path(d)).rule)
               for d in s.deps if PREV in _dep_path(d) or isinstance(d, IfMade)}
    key = "${key}" if varying else "${item}"
    tokens = {"res": key, "prev": "", "final": params.crop.size}
    deps = ["${{item." + varying[d] + "}}" if d in varying else d for d in s.deps]  # whole paths: differ per item
    do = _dvc_entry(s.command(key), _fill(deps, params, **tokens) + list(s.code),
                    _fill(s.params, params, **tokens), _fill_outs(s.outs, params, **tokens))
    if not varying:
        return {"foreach": [str(r) for r in own], "do": do}
    items = {}
    for r in own:
        j = job(params, s.name, r)
        tokens_r = _tokens(params, r)
        item = {}
        for d, name in varying.items():
            path = _fill([d], params, path=_dep_path, put=lambda e, p: p, **tokens_r)
            item[name] = path[0] if path and path[0] in j.deps else j.deps[0]
        items[str(r)] = item
    return {"foreach": items, "do": do}


def dvc_yaml(params) -> str:
    """The text of dvc.yaml for `params`: every stage of the table, per-resolution ones as `foreach` groups."""
    doc: dict = {"stages": {}}
    for name, s in STAGES.items():
        if s.per_res:
            if s.resolutions(params):                  # a stage with no job here (fid-stats at 16 px) is left out
                doc["stages"][name] = _foreach(params, s)
        else:
            j = job(params, name)
            doc["stages"][name] = _dvc_entry(j.cmd, j.deps + j.code, j.params, j.outs)
    doc["plots"] = [{o.path: o.plot} for j in jobs(params) for o in j.outs if o.plot]
    return DVC_HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)


def is_generated(text: str) -> bool:
    return text.startswith("# GENERATED ")


def sync_dvc_yaml(params) -> bool:
    """Rewrite dvc.yaml beside params.yaml when it was generated (our header) and no longer matches params.yaml;
    True when it was rewritten. A dvc.yaml someone took over (no header), or none at all, is left alone."""
    from progan.fileio import write_text
    from progan.log import log

    if Path(params.path).name != "params.yaml":      # DVC reads params.yaml: another file says nothing about it
        return False
    path = Path(params.root) / "dvc.yaml"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    if not is_generated(text):
        return False
    new = dvc_yaml(params)
    if text == new:
        return False
    try:
        write_text(path, new)
    except OSError as e:
        log.warning("dvc.yaml does not match params.yaml (%s) and cannot be rewritten here (%s): run "
                    "`progan dvc-yaml` where it can", dag_shape(params), e.strerror or e)
        return False
    log.info("dvc.yaml did not match params.yaml (%s): rewrote it", dag_shape(params))
    return True


def dag_shape(params) -> str:
    """What DAG_SHAPE_KEYS make of the DAG, in words: 'crop.size 16, train.start_px 4: stages 4, 8, 16' (and
    '; fid-stats at 32, 64' for each stage that runs at only some resolutions and has a job here)."""
    text = (f"crop.size {params.crop.size}, train.start_px {params.start_px}: "
            f"stages {', '.join(map(str, params.resolutions))}")
    for s in STAGES.values():
        if s.per_res and s.at is not None and s.resolutions(params):
            text += f"; {s.name} at {', '.join(map(str, s.resolutions(params)))}"
    return text


def run(params) -> None:
    """`progan dvc-yaml`: write dvc.yaml beside params.yaml."""
    from progan.fileio import write_text
    from progan.log import log

    write_text(Path(params.root) / "dvc.yaml", dvc_yaml(params))
    log.info("wrote dvc.yaml (%d jobs)", len(jobs(params)))


def repo_root() -> Path:
    """The checkout that holds Snakefile and dvc.yaml (src/progan/pipeline.py -> ../../)."""
    return Path(__file__).resolve().parents[2]


def under_dvc() -> bool:
    """True inside a command `dvc repro` / `dvc exp run` runs (DVC sets DVC_STAGE for every stage command)."""
    return bool(os.environ.get("DVC_STAGE"))
