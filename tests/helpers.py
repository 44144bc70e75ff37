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
    from progan import demo

    return yaml.safe_load(demo.template())


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
    data["train"]["prefetch"] = 0
    data["train"]["stages"] = {
        str(r): {"batch": 8, "lr": 0.001, "transition_kimg": 0 if r == 4 else 0.1, "stabilize_kimg": 0.1}
        for r in [2**k for k in range(2, size_px.bit_length())]
    }
    data["evaluate"].update(num_images=64, msssim_pairs=16, batch=32)
    data["evaluate"]["metrics"] = ["swd", "msssim", "fid", "kid"]    # the demo leaves fid/kid out; the tests keep them
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


def standin_inception(seed: int = 0, input_px: int = 32):
    """A stand-in for the Inception network of FID/KID/IS (its weights cannot be downloaded in tests): the
    interface of torch-fidelity's FeatureExtractorInceptionV3 (uint8 [B, 3, H, W] in; float32 pool features
    [B, 2048] and logits [B, 1008] out) and its feature sizes, random fixed weights, small and fast. It resizes
    with torch-fidelity's own TF1 bilinear resize, as the real network does (to `input_px`, not 299)."""
    import torch
    from torch import nn
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    class StandIn(FeatureExtractorBase):
        def __init__(self):
            super().__init__("standin-inception", ["2048", "logits_unbiased"])
            g = torch.Generator().manual_seed(seed)
            self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
            self.conv2 = nn.Conv2d(32, 128, 3, stride=2, padding=1)
            self.conv3 = nn.Conv2d(128, 2048, 1)
            self.fc = nn.Linear(2048, 1008, bias=False)
            for p in self.parameters():
                p.data = torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5 if p.dim() > 1 else 10)
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return "2048", "logits_unbiased"

        def forward(self, x):
            assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, (x.dtype, x.shape)
            x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(input_px, input_px), align_corners=False)
            x = (x - 128) / 128
            x = torch.relu(self.conv1(x))
            x = torch.relu(self.conv2(x))
            x = nn.functional.max_pool2d(x, 2)
            features = torch.relu(self.conv3(x)).mean((2, 3))                     # [B, 2048]
            return features, self.fc(features)                                   # [B, 1008]

    return StandIn()


def random_inception_weights(seed: int = 0) -> bytes:
    """torch.save of torch-fidelity's real FeatureExtractorInceptionV3 state dict with random weights (the published
    file cannot be downloaded in tests). The convolutions are He-normal, so that the features still vary with the
    images after the ~90 layers (torch's default init shrinks them to ~1e-8: FID ~1e-15, KID 0 whatever the images)."""
    import io
    from unittest import mock

    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    from progan.metrics import inception

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        net = fe.FeatureExtractorInceptionV3("x", list(inception.FEATURES), feature_extractor_weights_path=empty)
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        if p.dim() == 4:
            p.data = torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    return buf.getvalue()


def pin_inception_weights(src: Path, data: bytes) -> None:
    """Pin `data` in place of the published weights in a copy of the source tree (`src`/progan/metrics/inception.py;
    make_workspace's copy): subprocesses run with PYTHONPATH=`src` then accept that file, and only that one."""
    import hashlib

    from progan.metrics import inception

    path = src / "progan" / "metrics" / "inception.py"
    text = path.read_text()
    w = inception.WEIGHTS
    for old, new in ((f'sha256="{w.sha256}"', f'sha256="{hashlib.sha256(data).hexdigest()}"'),
                     (f"size_bytes={w.size_bytes:_}", f"size_bytes={len(data)}")):
        assert text.count(old) == 1, (path, old)
        text = text.replace(old, new)
    path.write_text(text)


def celeba_faces(n: int, res: int, start: int = 0):
    """uint8 [n, res, res, 3]: real CelebA faces (a centre crop of the aligned images), box-downsampled."""
    import numpy as np
    from PIL import Image

    faces = []
    for f in sorted(CELEBA_DIR.glob("*.jpg"))[start:start + n]:
        with Image.open(f) as im:
            faces.append(np.asarray(im.convert("RGB").crop((0, 20, 178, 198)).resize((res, res), Image.BOX)))
    return np.stack(faces)


def kill_when_file_exists(cmd: list[str], path: Path, *, env: dict, cwd: Path | None = None,
                          timeout_s: float = 240) -> None:
    """Run `cmd` and SIGKILL it (no handler, no cleanup) as soon as `path` exists; then assert it died by the
    signal and that `path` is there (the process did not finish, or fail, first). A hang fails after timeout_s."""
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.kill()
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -9, f"{' '.join(cmd)}: exit {proc.returncode} before {path} appeared"
    assert path.is_file(), f"{path} never appeared within {timeout_s} s"
