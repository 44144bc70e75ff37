"""The placeholders of the stage table's paths and params keys, filled per job (progan.pipeline.job):
  {res}    the job's resolution
  {prev}   the one before it; an entry with {prev} is left out of the first training job, at train.start_px: it
           starts from scratch
  {final}  crop.size
  {each}   every training resolution: consecutive {each} entries are repeated together for train.start_px, ...,
           crop.size
  {level}  every pyramid level, 4, 8, ..., crop.size (data does not depend on where training starts)
  {init_from}  train.init_from, in the first training job only (at train.start_px); an entry with it is left out
           everywhere else and when train.init_from is null
and `OptionalDep(path)`: a dep that a job has only where some job of the table writes it.
So `train.start_px: <crop.size>` (the official -nogrowing) is one train and one evaluate job, the train job reading
the pyramid level alone, in both front ends; nothing else changes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

RES, PREV, FINAL, EACH, LEVEL, INIT = "{res}", "{prev}", "{final}", "{each}", "{level}", "{init_from}"


@dataclass(frozen=True)
class OptionalDep:
    """A dep that a job has only where some job of the table makes it (evaluate@R's data/fid-stats/R.npz: only where
    fid-stats@R runs). DVC gets it per item of the foreach group (`${item.<producer's rule>}`)."""
    path: str


def template(entry) -> str:
    """The text of an entry, placeholders and all: a path or params key, or the path of an Out or OptionalDep."""
    return entry if isinstance(entry, str) else entry.path


def _with_text(entry, text: str):
    """`entry` (a str, an Out or an OptionalDep) with its placeholders filled: `text`."""
    return text if isinstance(entry, str) else dataclasses.replace(entry, path=text)


def prev_res(params, res: int) -> int | None:
    """The stage a training job at `res` grows from: res / 2, or None at train.start_px (from scratch)."""
    return res // 2 if res > params.start_px else None


def tokens(params, res: int | None) -> dict:
    """The values of {res}, {prev}, {final} and {init_from} in the job at `res` (None: a stage not per resolution)."""
    first = res is not None and res == params.start_px
    return {"res": res, "prev": prev_res(params, res) if res is not None else None, "final": params.crop.size,
            "init_from": params.train.init_from if first else None}


def fill(entries, params, *, res=None, prev=None, final=None, init_from=None) -> list:
    """The entries (str, Out or OptionalDep) with their placeholders filled (see the module docstring), each the same
    kind of entry as before. An entry with {prev} is left out when prev is None, one with {init_from} when
    init_from is None."""
    out, group = [], []
    over = {EACH: params.resolutions, LEVEL: params.levels}       # what {each} and {level} repeat over

    def fill_one(e, each=None):
        text = template(e)
        if RES in text and res is None:
            raise ValueError(f"{text}: {RES} in a stage that is not per resolution")
        return _with_text(e, text.format(res=res, prev=prev, final=final, each=each, level=each, init_from=init_from))

    def flush():
        if group:
            out.extend(fill_one(e, r) for r in over[group[0][0]] for _, e in group)
        group.clear()

    for e in entries:
        token = EACH if EACH in template(e) else LEVEL if LEVEL in template(e) else None
        if token is not None:
            if group and group[0][0] != token:
                flush()
            group.append((token, e))
            continue
        flush()
        if (PREV not in template(e) or prev is not None) and (INIT not in template(e) or init_from is not None):
            out.append(fill_one(e))
    flush()
    return out
