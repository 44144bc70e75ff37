"""Shared test helpers: params files in tmp dirs, real data paths."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CELEBA_DIR = SHARED_DATA / "celeba-aligned-2k"
PHOTOS_DIR = SHARED_DATA / "photos"


def default_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def demo_params() -> dict:
    return yaml.safe_load((REPO / "workflow" / "params.demo.yaml").read_text())


def set_key(data: dict, dotted: str, value) -> dict:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
    return data


def write_params(folder: Path, data: dict | None = None, **overrides) -> Path:
    """Write folder/params.yaml from `data` (default: the repo's params.yaml) with dotted-key overrides
    given as keyword arguments with '__' for '.', e.g. crop__size=32."""
    data = copy.deepcopy(data if data is not None else default_params())
    for key, value in overrides.items():
        set_key(data, key.replace("__", "."), value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_params(folder: Path, size_px: int = 16, images: Path | None = None, **overrides) -> Path:
    """A tiny real-face pipeline: folder source, tiny nets, few kimg per stage (for CPU tests)."""
    data = demo_params()
    data["data"]["folder"] = str(images or CELEBA_DIR)
    data["data"]["max_images"] = 200
    data["crop"]["size"] = size_px
    data["model"].update(latent_dim=16, fmap_base=64, fmap_max=16)
    data["train"]["snapshot_kimg"] = 0.1
    data["train"]["tick_kimg"] = 0.1
    data["train"]["num_workers"] = 0
    data["train"]["stages"] = {
        str(r): {"batch": 8, "lr": 0.001, "transition_kimg": 0 if r == 4 else 0.1, "stabilize_kimg": 0.1}
        for r in [2**k for k in range(2, size_px.bit_length())]
    }
    data["evaluate"].update(num_images=64, msssim_pairs=16, batch=32)
    data["report"].update(grid_images=16, interpolation_steps=4)
    return write_params(folder, data, **overrides)


def make_workspace(folder: Path) -> Path:
    """A project folder like a user's checkout: Snakefile, workflow/, dvc.yaml, params.yaml and a copy of src/
    (so tests may edit source files to prove that code changes re-run stages)."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("Snakefile", "dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / name, folder / name)
    shutil.copytree(REPO / "workflow", folder / "workflow", symlinks=True, ignore=ignore)
    shutil.copytree(REPO / "src", folder / "src", ignore=ignore)
    return folder


def tool_env() -> dict:
    """Environment for running snakemake / dvc / progan as a user would (the venv's bin first on PATH)."""
    import os
    import sys

    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["DVC_NO_ANALYTICS"] = "1"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env.pop("PROGAN_MLFLOW_PARENT_RUN_ID", None)
    return env
