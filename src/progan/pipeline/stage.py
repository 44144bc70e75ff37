"""The data model of the stage table (progan.pipeline.STAGES): a `Stage`, its outputs (`Out`, `Report`) and a `Job`.

A `Stage` holds what the front ends, the CLI, tracking and the report need to know:
  name     the command (`progan <name>`), the DVC stage (`<name>`, `<name>@<R>`) and the Snakemake rule ('-' -> '_')
  module   where its `run(params, ...)` lives (and, optionally, `add_arguments(parser)` for extra flags)
  help     its line in `progan --help`
  per_res  one job per training resolution: `--res R`, the Snakemake wildcard {res}, a DVC `foreach` group
  runs_at  for a per-resolution stage that runs at only some of them: a function of params giving those (fid-stats:
           the resolutions >= evaluate.fid.min_res_px, none when evaluate.metrics has no fid, kid or is); the keys
           it reads are DAG_SHAPE_KEYS
  deps     the data it reads; `code`: the source files it runs (an edit re-runs it); both are its inputs. A dep
           wrapped in `OptionalDep` is one only where a job of the table makes it (evaluate@R reads the reals'
           statistics where fid-stats@R runs)
  outs     what it writes, each an `Out` with its kind: plain, uncached (big, cheap to rebuild: DVC does not copy
           it into its cache), metrics (the few numbers people compare: progan.headline) or plots (DVC), folder
           or file, attached to its MLflow run or not, shown in Snakemake's report or not
  params   the dotted params.yaml keys it reads (tests/test_params_read.py records what `run()` reads and checks
           this list against it), so that editing a key re-runs exactly the stages that read it;
           WHOLE_PARAMS_YAML: all of them
  gpu      None (CPU only), "one" (one GPU when there is one) or a params key ("train.gpus": as many as it says,
           several = torchrun); progan.gpus turns it into the job's `gpu` resource and its lease
  mlflow   the job name of the MLflow child run it logs into (train and evaluate of a stage share one), or None
Paths and keys may hold placeholders, filled per job: progan.pipeline.placeholders.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from progan.pipeline.placeholders import OptionalDep

# As a params key: all of params.yaml, the dotted key of its root (Params.get("") is the whole file, and a recording
# Params records "" for to_dict() and digest()); DVC writes it `- params.yaml:`.
WHOLE_PARAMS_YAML = ""
OUT_KINDS = ("plain", "uncached", "metrics", "plots")
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
class Stage:
    name: str
    module: str
    help: str
    deps: tuple[str | OptionalDep, ...] = ()
    code: tuple[str, ...] = ()
    outs: tuple[Out, ...] = ()
    params: tuple[str, ...] = ()
    per_res: bool = False
    runs_at: Callable[[object], list[int]] | None = None  # per_res: the resolutions it runs at (None: all of them)
    gpu: str | None = None
    mlflow: str | None = None

    def resolutions(self, params) -> list[int]:
        """The resolutions this per-resolution stage has a job at (a subset of params.resolutions, in order)."""
        if not self.per_res:
            raise ValueError(f"stage {self.name} is not per resolution")
        if self.runs_at is None:
            return list(params.resolutions)
        chosen = set(self.runs_at(params))
        return [r for r in params.resolutions if r in chosen]

    def job_resolutions(self, params) -> list[int | None]:
        """The `res` of each of its jobs: its resolutions, or [None] for the one job of a stage not per resolution."""
        return self.resolutions(params) if self.per_res else [None]

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
