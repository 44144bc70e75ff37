"""The stage table: the one description of the DAG that both front ends are built from.

`workflow/rules/*.smk` build Snakemake rules from `stage()` (inputs, outputs, params values, GPUs),
and `dvc.yaml` is generated from `stages()` by `progan dvc-yaml` and committed; a test regenerates it
and diffs, another compares the graphs that `snakemake` and `dvc dag` report.

Each stage lists as deps the source files it runs (so editing the training code re-runs training, and
only training) and, as params, exactly the keys it reads (so editing `train.stages.64` re-runs stage 64
and what follows, not stages 4-32). Nothing that varies between invocations (run ids, times, absolute
paths) enters a command or a params list.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from progan import paths

# Source files each stage runs, relative to the repository root. Shared plumbing (cli, params, paths,
# fileio, log) is left out on purpose: a change there would re-run the whole DAG.
_MODEL = ["src/progan/model/layers.py", "src/progan/model/networks.py"]
SOURCES: dict[str, list[str]] = {
    "download": ["src/progan/data/download.py", "src/progan/data/archive.py"],
    "crop": ["src/progan/data/faces.py", "src/progan/data/mtcnn.py", "src/progan/data/images.py"],
    "pyramid": ["src/progan/data/pyramid.py"],
    "train": _MODEL + ["src/progan/train/loop.py", "src/progan/train/loss.py", "src/progan/train/schedule.py",
                       "src/progan/train/state.py", "src/progan/train/data.py", "src/progan/train/dist.py",
                       "src/progan/train/nonfinite.py"],
    "evaluate": _MODEL + ["src/progan/evaluate.py", "src/progan/metrics/swd.py", "src/progan/metrics/swd_reference.py",
                          "src/progan/metrics/msssim.py"],
    "report": _MODEL + ["src/progan/report/__init__.py", "src/progan/report/html.py", "src/progan/report/plots.py"],
}

# Params keys each stage reads (dotted, as DVC and `Params.get` take them).
DATA_KEYS = ["data.source", "data.url", "data.sha256", "data.md5", "data.folder", "data.max_images",
             "data.max_download_mb"]
CROP_KEYS = ["crop.detector", "crop.size", "crop.min_confidence", "crop.min_face_px", "crop.margin",
             "crop.min_input_px", "crop.min_kept_fraction", "crop.max_image_pixels"]
TRAIN_KEYS = ["seed", "model", "crop.size", "train.gpus", "train.tick_kimg", "train.loss", "train.gp_weight",
              "train.gp_resolution", "train.drift_weight", "train.betas", "train.adam_eps", "train.reset_opt_each_phase",
              "train.ema_decay", "train.mirror_augment", "train.max_consecutive_skips", "train.deterministic",
              "train.amp", "train.channels_last"]
EVAL_KEYS = ["evaluate", "train.mirror_augment"]   # evaluation mirrors the reals when training did
REPORT_KEYS = ["seed", "report", "crop.size"]


# How `dvc plots show` draws the report's TSV files.
PLOT_AXES = {
    paths.REPORT_SWD_PLOT: {"x": "res_px", "y": ["swd_avg", "swd_real_vs_real_avg"]},
    paths.REPORT_LOSS_PLOT: {"x": "total_kimg", "y": ["d_loss", "g_loss"]},
}


@dataclass(frozen=True)
class Stage:
    name: str                      # rule / DVC stage name: download, crop, pyramid, train, evaluate, report
    res: int | None                # resolution in px for per-stage jobs, else None
    cmd: str
    deps: list[str]                # data inputs (outputs of other stages or source data)
    code: list[str]                # source files the stage runs
    outs: list[str]
    params: list[str]
    metrics: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    uncached: list[str] = field(default_factory=list)   # outs DVC should not copy into its cache (big data)
    gpu: bool = False              # declares `resources: gpu=`

    @property
    def id(self) -> str:
        """DVC's name for the job (`train@16` for foreach stages); Snakemake's is (rule, res)."""
        return self.name if self.res is None else f"{self.name}@{self.res}"


def _cmd(name: str, res: int | None = None) -> str:
    return f"progan {name}" + (f" --res {res}" if res is not None else "") + " --params params.yaml"


def stage(params, name: str, res: int | None = None) -> Stage:
    size = int(params.crop.size)
    resolutions = params.resolutions
    if name == "download":
        return Stage(name, None, _cmd(name), [], SOURCES[name], [paths.IMAGES_LIST], list(DATA_KEYS))
    if name == "crop":
        return Stage(name, None, _cmd(name), [paths.IMAGES_LIST], SOURCES[name], [paths.FACES_DIR],
                     list(CROP_KEYS) + ["crop.batch_images"], uncached=[paths.FACES_DIR], gpu=True)
    if name == "pyramid":
        outs = [paths.pyramid_level(r) for r in resolutions] + [paths.PYRAMID_INFO]
        return Stage(name, None, _cmd(name), [paths.FACES_DIR], SOURCES[name], outs,
                     ["crop.size", "pyramid.chunk_images"], uncached=outs[:-1])
    if name == "train":
        deps = ([paths.checkpoint(res // 2)] if res > 4 else []) + [paths.pyramid_level(res)]
        outs = [paths.checkpoint(res), paths.losses_tsv(res), paths.samples_png(res)]
        return Stage(name, res, _cmd(name, res), deps, SOURCES[name], outs,
                     TRAIN_KEYS + [f"train.stages.{res}"], metrics=[paths.train_json(res)], gpu=True)
    if name == "evaluate":
        deps = [paths.checkpoint(res), paths.pyramid_level(res)]
        return Stage(name, res, _cmd(name, res), deps, SOURCES[name], [], list(EVAL_KEYS),
                     metrics=[paths.eval_json(res)], gpu=True)
    if name == "report":
        deps = [f for r in resolutions for f in (paths.eval_json(r), paths.train_json(r), paths.losses_tsv(r),
                                                 paths.samples_png(r))]
        deps += [paths.checkpoint(size), paths.pyramid_level(size)]
        return Stage(name, None, _cmd(name), deps, SOURCES[name], [paths.REPORT_HTML], list(REPORT_KEYS),
                     plots=[paths.REPORT_SWD_PLOT, paths.REPORT_LOSS_PLOT])
    raise KeyError(f"no stage named {name!r}")


def stages(params) -> list[Stage]:
    """Every job of the DAG in a valid order."""
    jobs = [stage(params, n) for n in ("download", "crop", "pyramid")]
    for r in params.resolutions:
        jobs.append(stage(params, "train", r))
    for r in params.resolutions:
        jobs.append(stage(params, "evaluate", r))
    jobs.append(stage(params, "report"))
    return jobs


def edges(params) -> set[tuple[str, str]]:
    """(producer id, consumer id) pairs, derived from deps and outs (what both tools should report)."""
    jobs = stages(params)
    producer = {out: j.id for j in jobs for out in j.outs + j.metrics + j.plots}
    return {(producer[d], j.id) for j in jobs for d in j.deps if d in producer}


# ---- dvc.yaml -------------------------------------------------------------------------------------

def _dvc_entry(s: Stage) -> dict:
    entry: dict = {"cmd": s.cmd}
    if s.deps or s.code:
        entry["deps"] = s.deps + s.code
    if s.params:
        entry["params"] = list(s.params)
    outs = [({o: {"cache": False}} if o in s.uncached else o) for o in s.outs]
    if outs:
        entry["outs"] = outs
    if s.metrics:
        entry["metrics"] = [{m: {"cache": False}} for m in s.metrics]
    if s.plots:
        entry["plots"] = [{p: {"cache": False}} for p in s.plots]
    return entry


_SENTINEL = 1 << 20   # a resolution no real stage has: stands for DVC's ${key} in foreach templates


def _foreach_template(params, name: str) -> tuple[dict, dict[str, dict]]:
    """A DVC `foreach` group for a per-resolution stage: the `do` template and the items.

    The one dep that differs between resolutions is the previous stage's checkpoint; it becomes
    `${item.prev}`. Stage 4 has none, so its `prev` is its own pyramid level (listed twice; DVC
    counts it once). Every expansion is checked against `stage()` so the template cannot drift.
    """
    tmpl = _dvc_entry(stage(params, name, _SENTINEL))
    prev_path = paths.checkpoint(_SENTINEL // 2)

    def sub(value):
        if isinstance(value, dict):
            return {sub(k): sub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [sub(v) for v in value]
        if value == prev_path:
            return "${item.prev}"
        return value.replace(str(_SENTINEL), "${key}") if isinstance(value, str) else value

    do = sub(tmpl)
    items = {}
    for r in params.resolutions:
        s = stage(params, name, r)
        prev = paths.checkpoint(r // 2) if r > 4 else paths.pyramid_level(r)
        items[str(r)] = {"prev": prev} if "${item.prev}" in do.get("deps", []) else {}
        expanded = yaml.safe_load(yaml.safe_dump(do).replace("${key}", str(r)).replace("${item.prev}", prev))
        want = _dvc_entry(s)
        assert {k: v for k, v in expanded.items() if k != "deps"} == {k: v for k, v in want.items() if k != "deps"}
        assert set(expanded.get("deps", [])) == set(want.get("deps", [])), (name, r)
    if not any(items.values()):
        items = list(items)  # a plain list of resolutions when no item data is needed
    return do, items


def dvc_yaml(params) -> str:
    """dvc.yaml text. Per-resolution jobs are DVC `foreach` stages keyed by resolution (`train@16`)."""
    doc: dict = {"stages": {}}
    for s in stages(params):
        if s.res is None:
            doc["stages"][s.name] = _dvc_entry(s)
        elif s.name not in doc["stages"]:
            do, items = _foreach_template(params, s.name)
            if isinstance(items, list):
                do = yaml.safe_load(yaml.safe_dump(do).replace("${key}", "${item}"))
            doc["stages"][s.name] = {"foreach": items, "do": do}
    doc["plots"] = [{p: axes} for p, axes in PLOT_AXES.items()]
    header = ("# GENERATED by `progan dvc-yaml` from src/progan/pipeline.py and params.yaml: do not edit by hand.\n"
              "# Regenerate after changing crop.size or the stage table; tests/test_pipeline.py checks it.\n")
    return header + yaml.safe_dump(doc, sort_keys=False, width=120)


def run(params) -> None:
    """`progan dvc-yaml`: write dvc.yaml beside params.yaml."""
    from progan.fileio import write_text
    from progan.log import log

    write_text("dvc.yaml", dvc_yaml(params))
    log.info("wrote dvc.yaml (%d jobs)", len(stages(params)))


def repo_root() -> Path:
    """The checkout that holds Snakefile and dvc.yaml (src/progan/pipeline.py -> ../../)."""
    return Path(__file__).resolve().parents[2]
