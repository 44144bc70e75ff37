"""Checkpoints (one per finished stage) and snapshots (mid-stage resume) as plain dicts.

Both load with `torch.load(weights_only=True)`: only tensors, numbers, strings, lists and dicts inside
(RNG states are converted to tensors/lists/ints). Every file is written atomically (fileio.atomic_path).

Checkpoint (`results/<R>/checkpoint.pt`):
    {"format": "progan-checkpoint", "version": 1, "res_px", "model": asdict(ModelConfig), "G", "D", "G_ema",
     "opt_G", "opt_D", "cur_nimg" (images of this stage), "total_kimg" (all stages so far), "alpha", "rng",
     "params": {dotted key: value} for the keys the stage declares, "prev_checkpoint_sha256": str | None}
Snapshot (`results/<R>/.resume/snapshot.pt`): the same networks/optimizers plus what the loop needs to
continue bit-identically (RNG states, sampler state, loss rows, timers); format "progan-snapshot".
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from progan.errors import ProganError, refused_code_error, torch_load_failure
from progan.fileio import atomic_path, torch_load

CHECKPOINT_FORMAT = "progan-checkpoint"
SNAPSHOT_FORMAT = "progan-snapshot"
VERSION = 1
SNAPSHOT_NAME = "snapshot.pt"



# ----------------------------------------------------------------------------------------------------------
# RNG state as weights_only-safe values.

def get_rng_state() -> dict:
    """torch (CPU and every CUDA device), numpy global and python `random` states."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "state": [int(v) for v in py_state], "gauss_next": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# ----------------------------------------------------------------------------------------------------------
# Save / load.

def save(path: str | Path, obj: dict) -> None:
    """torch.save to a temp file beside `path`, then rename (a killed process never leaves half a file).

    Saved through a file object: given a path, torch.save names the zip's inner folder after the (random) temp
    file, so identical checkpoints would differ in bytes and DVC would re-run every stage downstream."""
    with atomic_path(path, suffix=".pt") as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def _load(path: Path, what: str, fix: str) -> dict:
    try:
        obj = torch_load(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file, reported in one line
        blocked, reason, _ = torch_load_failure(e)
        if blocked:
            raise refused_code_error(path, blocked, what, fix) from None
        raise ProganError(f"{path}: truncated or not a {what} ({reason}); {fix}") from None
    if not isinstance(obj, dict):
        raise ProganError(f"{path}: not a {what} (holds a {type(obj).__name__}); {fix}")
    return obj


def load_checkpoint(path: str | Path, res_px: int) -> dict:
    """Load and check the checkpoint of stage `res_px`; one-line ProganError when missing, truncated or foreign."""
    path = Path(path)
    fix = f"delete it and run `progan train --res {res_px}` again"
    if not path.is_file():
        raise ProganError(f"{path} not found: run `progan train --res {res_px}` first")
    ckpt = _load(path, "progan checkpoint", fix)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ProganError(f"{path}: not a progan checkpoint (format {ckpt.get('format')!r}); {fix}")
    if ckpt.get("version") != VERSION:
        raise ProganError(f"{path}: checkpoint version {ckpt.get('version')!r}, this code reads version {VERSION}; {fix}")
    if ckpt.get("res_px") != res_px:
        raise ProganError(f"{path}: holds the {ckpt.get('res_px')} px stage, expected {res_px} px; {fix}")
    missing = [k for k in ("model", "G", "D", "G_ema", "opt_G", "opt_D", "cur_nimg", "total_kimg") if k not in ckpt]
    if missing:
        raise ProganError(f"{path}: checkpoint lacks {', '.join(missing)}; {fix}")
    return ckpt


def load_snapshot(path: str | Path) -> dict | None:
    """The snapshot dict, or None when absent. A damaged snapshot is an error (it is never silently dropped)."""
    path = Path(path)
    if not path.is_file():
        return None
    fix = f"delete {path.parent} to restart the stage from its beginning"
    snap = _load(path, "progan snapshot", fix)
    if snap.get("format") != SNAPSHOT_FORMAT or snap.get("version") != VERSION:
        raise ProganError(f"{path}: not a version-{VERSION} progan snapshot "
                          f"(format {snap.get('format')!r}, version {snap.get('version')!r}); {fix}")
    return snap


# ----------------------------------------------------------------------------------------------------------
# Optimizer state across stages (only used when train.reset_opt_each_phase is false).

def remap_optimizer_state(prev_state: dict, prev_names: list[str], new_names: list[str]) -> dict:
    """Adam state of the previous stage's optimizer re-indexed for the grown network's parameter list.

    torch optimizers key their state by parameter position; names tie positions across stages.
    Parameters new in this stage get no state (Adam starts them from zero moments).
    """
    new_index = {n: i for i, n in enumerate(new_names)}
    state = {}
    for old_i, name in enumerate(prev_names):
        if old_i in prev_state["state"] and name in new_index:
            state[new_index[name]] = prev_state["state"][old_i]
    groups = [dict(prev_state["param_groups"][0], params=list(range(len(new_names))))]
    return {"state": state, "param_groups": groups}
