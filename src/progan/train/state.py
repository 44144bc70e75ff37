"""Training state that checkpoints carry (the file format itself is progan/checkpoint.py's):
RNG states as weights_only-safe values (tensors, lists, ints) and Adam state carried across stages by name.
"""
from __future__ import annotations

import random

import numpy as np
import torch


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
# Optimizer state across stages (only used when train.reset_opt_each_phase is false).

def remap_optimizer_state(prev_state: dict, prev_names: list[str], new_params: list[tuple[str, torch.Tensor]]) -> dict:
    """Adam state of the previous stage's optimizer re-indexed for the grown network's (name, parameter) list.

    torch optimizers key their state by parameter position; names tie positions across stages. A parameter new in
    this stage starts with zero moments at the step count the others have reached: the official never-reset run
    (train.py L137 reset_opt_for_new_lod = False) builds every layer at the start under one tf.train.AdamOptimizer,
    whose bias correction uses one step count for all variables (its beta1_power / beta2_power), and a layer that has
    had no gradient yet has zero moments (beta1 = 0). So its first update is lr * sqrt(1 - beta2^t) * g / sqrt((1 -
    beta2) g^2), about 10 lr, not the lr of a fresh Adam (tests/test_train.py rebuilds the TF Adam update).
    """
    new_index = {n: i for i, (n, _) in enumerate(new_params)}
    state = {}
    for old_i, name in enumerate(prev_names):
        if old_i in prev_state["state"] and name in new_index:
            state[new_index[name]] = prev_state["state"][old_i]
    steps = [torch.as_tensor(s["step"]) for s in state.values() if "step" in s]
    if steps:
        step = max(steps, key=float)
        for i, (_, param) in enumerate(new_params):
            if i not in state:
                zeros = torch.zeros_like(param, memory_format=torch.preserve_format).detach()
                state[i] = {"step": step.clone(), "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
    groups = [dict(prev_state["param_groups"][0], params=list(range(len(new_params))))]
    return {"state": state, "param_groups": groups}
