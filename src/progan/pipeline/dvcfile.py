"""dvc.yaml, written from the stage table (progan.pipeline.STAGES) and params.yaml.

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

import os
from pathlib import Path

import yaml

from progan.pipeline import STAGES, jobs
from progan.pipeline.placeholders import PREV, OptionalDep, fill, template, tokens
from progan.pipeline.stage import WHOLE_PARAMS_YAML, Job, Out, Stage

DVC_HEADER = ("# GENERATED from src/progan/pipeline.py and params.yaml: do not edit by hand. It follows params.yaml\n"
              "# by itself (every `progan` stage command and the Snakefile rewrite it when crop.size, train.start_px,\n"
              "# evaluate.metrics or evaluate.fid.min_res_px change the stages); `progan dvc-yaml` rewrites it.\n")


def _dvc_entry(cmd: str, deps: list[str], params: list[str], outs: list[Out]) -> dict:
    entry: dict = {"cmd": cmd}
    if deps:
        entry["deps"] = list(dict.fromkeys(deps))
    if WHOLE_PARAMS_YAML in params:
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


def _producer(path: str) -> Stage:
    """The per-resolution stage whose output pattern is `path` (an OptionalDep's)."""
    for s in STAGES.values():
        if s.per_res and path in (o.path for o in s.outs):
            return s
    raise ValueError(f"OptionalDep({path!r}): no per-resolution stage writes it")


def _foreach(params, s: Stage, job_at: dict[int, Job]) -> dict:
    """A DVC `foreach` group for per-resolution stage `s` (`job_at`: its jobs by resolution): the `do` template and
    the items, keyed by resolution (DVC names the jobs `train@16`). DVC cannot compute R/2, nor leave a dep out of
    one item, so a dep that varies between items (a {prev} dep, an OptionalDep) becomes `${item.<name>}`, given per
    item (`prev`; an OptionalDep: the rule name of the stage that makes it); an item without it (the first training
    job, at train.start_px; evaluate@R below evaluate.fid.min_res_px) gets its first other dep there instead (DVC
    counts a dep once)."""
    varying = {d: ("prev" if PREV in template(d) else _producer(template(d)).rule)
               for d in s.deps if PREV in template(d) or isinstance(d, OptionalDep)}
    key = "${key}" if varying else "${item}"
    key_tokens = {"res": key, "prev": "", "final": params.crop.size}
    deps = ["${{item." + varying[d] + "}}" if d in varying else d for d in s.deps]  # whole paths: differ per item
    do = _dvc_entry(s.command(key), fill(deps, params, **key_tokens) + list(s.code),
                    fill(s.params, params, **key_tokens), fill(s.outs, params, **key_tokens))
    if not varying:
        return {"foreach": [str(r) for r in job_at], "do": do}
    items = {}
    for r, j in job_at.items():
        item = {}
        for d, name in varying.items():
            path = [template(e) for e in fill([d], params, **tokens(params, r))]
            item[name] = path[0] if path and path[0] in j.deps else j.deps[0]
        items[str(r)] = item
    return {"foreach": items, "do": do}


def dvc_yaml(params) -> str:
    """The text of dvc.yaml for `params`: every stage of the table, per-resolution ones as `foreach` groups."""
    all_jobs = jobs(params)
    doc: dict = {"stages": {}}
    for name, s in STAGES.items():
        own = [j for j in all_jobs if j.stage is s]
        if s.per_res:
            if own:                                    # a stage with no job here (fid-stats at 16 px) is left out
                doc["stages"][name] = _foreach(params, s, {j.res: j for j in own})
        else:
            j, = own
            doc["stages"][name] = _dvc_entry(j.cmd, j.deps + j.code, j.params, j.outs)
    doc["plots"] = [{o.path: o.plot} for j in all_jobs for o in j.outs if o.plot]
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
        if s.per_res and s.runs_at is not None and s.resolutions(params):
            text += f"; {s.name} at {', '.join(map(str, s.resolutions(params)))}"
    return text


def run(params) -> None:
    """`progan dvc-yaml`: write dvc.yaml beside params.yaml."""
    from progan.fileio import write_text
    from progan.log import log

    write_text(Path(params.root) / "dvc.yaml", dvc_yaml(params))
    log.info("wrote dvc.yaml (%d jobs)", len(jobs(params)))


def under_dvc() -> bool:
    """True inside a command `dvc repro` / `dvc exp run` runs (DVC sets DVC_STAGE for every stage command)."""
    return bool(os.environ.get("DVC_STAGE"))
