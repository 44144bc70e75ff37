"""CUDA against the CPU on the same inputs (issue #18). CI has no GPU: run these with `make test-gpu` on a GPU
machine (README, GPU section), which also runs `make bench-gpu` and writes a log and a JSON summary.

Each comparison is written once, against a `device` parameter:
- `cuda` (marked `gpu`, skipped with the reason when torch sees no CUDA device) compares CUDA with the CPU;
- `cpu-self-check` runs the very same code with the CPU on both sides, on the cheapest cases, in every `make test`,
  so that a typo or an API drift fails in CI and not on the next lent GPU (a few seconds in all).
The tests that need a real device throughout (the DAG, the out-of-memory, the resume, torchrun) are `cuda` only;
their CPU twins are tests/test_simulated_devices.py, test_faults.py, test_resume.py and test_dist.py.

Tolerances, and why (each test says which applies):
- fp32 with TF32 off (`torch.backends.cudnn.allow_tf32 = False`, matmuls are not TF32 by default): the same
  math, other summation orders and cuDNN's own algorithms: ~1e-6 relative per layer, so 1e-4 relative after
  the penalty's double backward;
- cuDNN's default TF32 convolutions (what training gets unless it turns them off: PyTorch's default): products
  rounded to 10 mantissa bits, ~1e-3 relative: 1e-2;
- bf16 autocast (train.amp): 8 mantissa bits, and after a few hundred steps the trajectory has left fp32's: the
  band is what fp32 itself varies by with another seed;
- exact where the operations are exact on any IEEE device: gathers, flips, uint8 -> [-1, 1], copies.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import progan
from progan import gpus, params as params_mod, paths
from progan.data import mtcnn as M
from progan.data.images import load_rgb
from progan.metrics import fid, inception, msssim, swd
from progan.model.networks import Discriminator, Generator, ModelConfig
from progan.train import data, loop, nets as nets_mod, step
from progan.train.loss import penalty_resolution_factor

from helpers import PHOTOS_DIR, celeba_faces, kill_when_file_exists, random_inception_weights, tiny_params, tool_env
from test_resume import STAGES, _loss_columns
from test_simulated_devices import faces, run_dag_on_one_device  # noqa: F401 (faces: a fixture)
from test_train import NO_MLFLOW, _stage, make_project

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: run `make test-gpu` on a GPU machine")
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2 if HAS_CUDA else True,
                               reason=f"torchrun on NCCL needs 2 CUDA devices, torch sees "
                                      f"{torch.cuda.device_count() if HAS_CUDA else 'no CUDA'}")
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda], id="cuda")
SELF_CHECK = pytest.param("cpu", id="cpu-self-check")
BOTH = [CUDA, SELF_CHECK]
gpu_only = [pytest.mark.gpu, needs_cuda]

pytestmark = pytest.mark.timeout(600)
RUN_TIMEOUT_S = 300              # one `progan` command on tiny nets: seconds on a GPU; a hang fails the test


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread_without_cuda():
    """The CPU self-check on a shared 2-core machine: one intra-op thread is far faster (no OpenMP spinning). With
    CUDA the CPU references keep every core."""
    before = torch.get_num_threads()
    if not HAS_CUDA:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def tf32(convolutions: bool):
    """cuDNN's TF32 convolutions on or off (matmuls stay fp32, PyTorch's default), restored afterwards."""
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = convolutions, False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def first_devices(n: int) -> str:
    """CUDA_VISIBLE_DEVICES for the first n devices the lease code sees (CUDA_VISIBLE_DEVICES, else nvidia-smi)."""
    return ",".join(gpus.visible_devices()[:n])


def gpu_env(tmp_path: Path, devices: str, **extra) -> dict:
    env = {**tool_env(), "CUDA_VISIBLE_DEVICES": devices, gpus.LOCK_DIR_ENV: str(tmp_path / "locks"),
           "MLFLOW_TRACKING_URI": NO_MLFLOW, **extra}
    for key in (gpus.BUDGET_ENV, gpus.REQUEST_ENV, "LOCAL_RANK", "RANK", "WORLD_SIZE", "SLURM_JOB_ID"):
        env.pop(key, None)
    return env


def progan_cmd(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("progan")), *args]


def error_line(stderr: str) -> str:
    """The CLI's one-line error: the last line of stderr (log lines come before it)."""
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------- one training step

RES, BATCH, ALPHA = 16, 16, 0.5      # 16 px mid fade-in: fade_reals, the upsampling and both toRGB/fromRGB paths


def step_params(folder: Path, seed: int = 0):
    """Small nets (latent 32, up to 32 feature maps), the demo's recipe (WGAN-GP, lr 0.001, beta1 0)."""
    return params_mod.load(tiny_params(folder, size_px=RES, seed=seed, model__latent_dim=32, model__fmap_base=128,
                                       model__fmap_max=32))


def fresh_nets(params) -> nets_mod.Nets:
    """G, D, G_ema at RES from the seeded init of nets.build_networks (no previous stage: a fade-in from scratch)."""
    cfg = ModelConfig.from_params(params)
    torch.manual_seed(step.derive_seed(params.seed, RES, 1))
    G, D = Generator(cfg, RES), Discriminator(cfg, RES)
    return nets_mod.Nets(G, D, copy.deepcopy(G).eval().requires_grad_(False), cfg, None, None, [])


def on_device(nets: nets_mod.Nets, device: torch.device, channels_last: bool) -> nets_mod.Nets:
    """A copy of the nets on `device`, as the loop places them (train.channels_last: every net in that format)."""
    out = copy.deepcopy(nets)
    for net in (out.G, out.D, out.G_ema):
        net.to(device)
        if channels_last:
            net.to(memory_format=torch.channels_last)
    return out


def step_settings(params) -> step.Settings:
    tp = params.train
    return step.Settings(tp.loss, tp.gp_weight, tp.drift_weight, tp.ema_decay,
                         penalty_resolution_factor(tp.gp_resolution, int(params.crop.size), RES))


@pytest.fixture(scope="module")
def real_faces() -> np.ndarray:
    """uint8 [64, 16, 16, 3]: real CelebA faces."""
    return celeba_faces(64, RES)


def one_step(params, nets0, device: str, channels_last: bool, faces_u8: np.ndarray):
    """One train_step (D step with the penalty, G step, EMA) of the first minibatch on `device`: (stats [7] on the
    CPU, {net: state dict on the CPU})."""
    dev = torch.device(device)
    nets = on_device(nets0, dev, channels_last)
    adam = nets_mod.Adam.from_params(params, RES)
    opt_G, opt_D = adam.make(nets.G), adam.make(nets.D)
    idx, flip = data.Sampler(len(faces_u8), params.seed, RES, True).indices(0, BATCH)
    inputs = step.step_inputs(params.seed, RES, BATCH, 0, torch.from_numpy(faces_u8[idx]), torch.from_numpy(flip),
                              ALPHA, nets.cfg.latent_dim, dev, channels_last)
    stats = step.train_step(nets, opt_G, opt_D, inputs, step_settings(params), 1, loop.autocast_context(False))
    states = {name: {k: v.detach().float().cpu() for k, v in getattr(nets, name).state_dict().items()}
              for name in ("G", "D", "G_ema")}
    return stats.cpu(), states


def weight_mismatches(want: dict, got: dict, rtol: float, atol: float, max_step: float) -> list[str]:
    """Tensors whose elements differ beyond rtol/atol. A gradient within rounding of zero may change sign, and
    one Adam step with beta1 = 0 moves a weight by at most lr: per tensor at most max(1, 0.1%) of the elements may
    differ, each by at most 2 lr (max_step)."""
    bad = []
    for net in want:
        for key, w in want[net].items():
            g = got[net][key]
            diff = (g - w).abs()
            outside = ~torch.isclose(g, w, rtol=rtol, atol=atol)
            n_out, allowed = int(outside.sum()), max(1, w.numel() // 1000)
            if n_out > allowed or (n_out and float(diff.max()) > max_step):
                bad.append(f"{net}.{key}: {n_out}/{w.numel()} elements outside rtol {rtol} atol {atol} "
                           f"(max |diff| {float(diff.max()):.3g})")
    return bad


STEP_CASES = {   # id: (channels_last, cuDNN TF32 convolutions, stats rtol, stats atol, weights rtol, weights atol)
    "fp32": (False, False, 1e-4, 1e-5, 1e-4, 1e-6),               # TF32 off: summation order, cuDNN algorithms
    "fp32-channels-last": (True, False, 1e-4, 1e-5, 1e-4, 1e-6),  # NHWC kernels, fp32 accumulation: the same
    "cudnn-tf32": (False, True, 1e-2, 1e-3, 1e-2, 1e-5),          # PyTorch's default: convolutions in TF32
}


@pytest.mark.parametrize("case", list(STEP_CASES))
@pytest.mark.parametrize("device", BOTH)
def test_one_training_step_matches_the_cpu(device, case, tmp_path, real_faces):
    """G, D, penalty and EMA: one train_step on `device` against the same step on the CPU from the same weights
    and inputs: the step's statistics within the case's tolerance (module docstring), every weight of G, D and
    G_ema too (after one Adam step a weight has moved by ~lr = 1e-3: the weight atol is a thousandth of that in
    fp32, a hundredth with TF32). The CPU self-check is exact for the plain fp32 case (same code, same order)."""
    channels_last, conv_tf32, s_rtol, s_atol, w_rtol, w_atol = STEP_CASES[case]
    params = step_params(tmp_path)
    nets0 = fresh_nets(params)
    want_stats, want = one_step(params, nets0, "cpu", False, real_faces)
    with tf32(conv_tf32):
        got_stats, got = one_step(params, nets0, device, channels_last, real_faces)
    names = step.STEP_STATS
    assert torch.isfinite(want_stats).all() and torch.isfinite(got_stats).all(), (want_stats, got_stats)
    assert got_stats[len(names) - 2:].tolist() == want_stats[len(names) - 2:].tolist() == [0.0, 0.0]   # not skipped
    torch.testing.assert_close(got_stats, want_stats, rtol=s_rtol, atol=s_atol,
                               msg=lambda m: f"{case}: stats {dict(zip(names, got_stats.tolist()))} vs CPU "
                                             f"{dict(zip(names, want_stats.tolist()))}: {m}")
    lr = params.stage(RES).lr
    bad = weight_mismatches(want, got, w_rtol, w_atol, max_step=2 * lr + w_atol)
    assert not bad, f"{case} on {device}: " + "; ".join(bad[:8])
    moved = sum(int(not torch.equal(want["G"][k], nets0.G.state_dict()[k])) for k in want["G"])
    assert moved > 5                                      # the step really changed G
    if device == "cpu" and case == "fp32":
        assert torch.equal(got_stats, want_stats)
        assert all(torch.equal(got[n][k], want[n][k]) for n in want for k in want[n])


# ------------------------------------------------------------------------------------ bf16 over a few hundred steps

AMP_RUN = {"cuda": (300, 50), "cpu": (4, 2)}   # (steps, window) per device; the self-check only runs the code


def run_steps(params, device: str, amp: bool, steps: int, faces_u8: np.ndarray) -> np.ndarray:
    """`steps` minibatches of the loop's own path (Sampler, Batches, step_inputs, train_step; bf16 autocast as the
    loop sets it: only on CUDA) from the seeded init; the stats of every step [steps, 7]."""
    dev = torch.device(device)
    nets = on_device(fresh_nets(params), dev, False)
    adam = nets_mod.Adam.from_params(params, RES)
    opt_G, opt_D = adam.make(nets.G), adam.make(nets.D)
    sampler = data.Sampler(len(faces_u8), params.seed, RES, True)
    batches = data.Batches(faces_u8, sampler, BATCH, 0, steps * BATCH, prefetch=0, pin_memory=dev.type == "cuda")
    autocast = loop.autocast_context(amp and dev.type == "cuda")
    settings = step_settings(params)
    out = []
    for cur_nimg, x_u8, flip in batches:
        inputs = step.step_inputs(params.seed, RES, BATCH, cur_nimg, x_u8, flip, 1.0, nets.cfg.latent_dim, dev)
        out.append(step.train_step(nets, opt_G, opt_D, inputs, settings, 1, autocast))
    return torch.stack(out).cpu().numpy()


@pytest.mark.parametrize("device", BOTH)
def test_bf16_autocast_stays_within_the_fp32_band(device, tmp_path):
    """train.amp: a few hundred steps of small nets on real faces (16 px, stabilising) in bf16 autocast against
    fp32 from the same init and batches. bf16 has 8 mantissa bits, so the trajectories part after a few steps and
    the losses can only be compared statistically: every step finite and none skipped, and each 50-step mean of
    each loss within the band fp32 itself spans with another seed (twice the largest gap between the window means
    of seeds 0 and 1, + 1e-3)."""
    steps, window = AMP_RUN[device]
    faces_u8 = celeba_faces(256 if device == "cuda" else 16, RES)
    params_a, params_b = step_params(tmp_path / "a", seed=0), step_params(tmp_path / "b", seed=1)
    fp32_a = run_steps(params_a, device, False, steps, faces_u8)
    fp32_b = run_steps(params_b, device, False, steps, faces_u8)
    bf16_a = run_steps(params_a, device, True, steps, faces_u8)
    keys = step.STEP_STATS[:5]
    assert np.isfinite(bf16_a).all(), "bf16 gave non-finite statistics"
    assert bf16_a[:, 5:].sum() == 0, f"bf16 skipped {bf16_a[:, 5:].sum(0)} (D, G) steps with non-finite gradients"

    def means(x):
        return x[:, :5].reshape(-1, window, 5).mean(1)                      # [windows, 5]

    a, b, h = means(fp32_a), means(fp32_b), means(bf16_a)
    band = 2 * np.abs(b - a).max(0) + 1e-3
    off = np.abs(h - a).max(0)
    table = "; ".join(f"{k}: bf16 - fp32 {o:.4g} (band {w:.4g})" for k, o, w in zip(keys, off, band))
    print(f"bf16 vs fp32 over {steps} steps, windows of {window}: {table}")
    assert (np.abs(b - a).max(0) > 0).all(), "seeds 0 and 1 gave the same losses: the runs are not what they seem"
    assert (off <= band).all(), table
    if device == "cpu":                       # the loop runs bf16 only on CUDA: on the CPU it is fp32, exactly
        assert np.array_equal(bf16_a, fp32_a)


# --------------------------------------------------------------------------------------- the level on the device

@pytest.mark.parametrize("setting", ["auto", True])
@pytest.mark.parametrize("device", BOTH)
def test_batches_gathered_on_the_device_are_the_cpu_ones(device, setting, tmp_path, real_faces):
    """train.data_on_device auto (on CUDA: a small level fits) and forced: the level held on `device` gives the
    same minibatches as the memmap on the host, over an epoch boundary and for rank 1 of 2: the same indices and
    flips, hence bit-identical uint8 batches and [-1, 1] reals (a gather, a flip and x * 2/255 - 1 are exact on any
    IEEE device); the latents and penalty factors crossing from pinned memory without a sync arrive bit-identical;
    the faded reals (alpha 0.5: pool, upsample, lerp) within 1e-6 (a fused multiply-add may round once less)."""
    dev = torch.device(device)
    np.save(tmp_path / "16.npy", real_faces)
    level = np.load(tmp_path / "16.npy", mmap_mode="r")
    keep = data.keep_on_device(setting, level.nbytes, dev)
    assert keep == (setting is True or dev.type == "cuda")
    held = data.resident_level(level, dev) if keep else level
    seed, batch, latent = 3, 24, 32
    sampler = data.Sampler(len(level), seed, RES, True)
    for rank, world in ((0, 1), (1, 2)):
        host = data.Batches(level, sampler, batch, 0, 5 * batch, rank, world, prefetch=2, pin_memory=dev.type == "cuda")
        there = data.Batches(held, sampler, batch, 0, 5 * batch, rank, world, prefetch=2, pin_memory=dev.type == "cuda")
        count = 0
        for (n1, x1, f1), (n2, x2, f2) in zip(host, there):
            assert n1 == n2 and torch.equal(f1, f2)
            assert x2.device.type == (dev.type if keep else "cpu")
            assert torch.equal(x1, x2.cpu()), (rank, n1)
            assert torch.equal(data.to_device(x1, f1, torch.device("cpu")), data.to_device(x2, f2, dev).cpu())
            a = step.step_inputs(seed, RES, batch, n1, x1, f1, 0.5, latent, torch.device("cpu"), rank=rank, world=world)
            b = step.step_inputs(seed, RES, batch, n2, x2, f2, 0.5, latent, dev, rank=rank, world=world)
            for name in ("z_d", "z_g", "mix"):
                assert getattr(b, name).device.type == dev.type
                assert torch.equal(getattr(a, name), getattr(b, name).cpu()), name
            torch.testing.assert_close(b.reals.cpu(), a.reals, rtol=0, atol=1e-6)
            count += 1
        assert count == 5 and 5 * batch > len(level)                    # crossed an epoch boundary


# ------------------------------------------------------------------------------------------------------- MTCNN

SELF_CHECK_PHOTOS = ["facenet__Anthony_Hopkins_0001.jpg", "afhq__flickr_cat_000253.jpg"]


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def unmatched_faces(want: list, got: list, near: float) -> list[str]:
    """Faces of `want` with no face in `got` at IoU >= 0.95 and score within 1e-3 (landmarks within 1 px);
    faces scoring within `near` of the O-Net threshold may fall on either side of it and are not required."""
    out = []
    for f in want:
        if f.score < M.THRESHOLDS[2] + near:
            continue
        best = max(got, key=lambda g: _iou(f.box, g.box), default=None)
        if best is None or _iou(f.box, best.box) < 0.95 or abs(best.score - f.score) > 1e-3 \
                or np.abs(best.landmarks - f.landmarks).max() > 1.0:
            out.append(f"box {np.round(f.box, 1).tolist()} p {f.score:.5f} -> "
                       + (f"IoU {_iou(f.box, best.box):.4f} p {best.score:.5f}" if best is not None else "none"))
    return out


@pytest.mark.parametrize("device", BOTH)
def test_mtcnn_finds_the_same_faces(device):
    """MTCNN on `device` against the CPU on the real photos (every trap of photos/README; all 43 on CUDA, two on
    the self-check): each face found by one is found by the other, IoU >= 0.95, scores within 1e-3, landmarks
    within 1 px (the detector turns TF32 off on CUDA: fp32 throughout, so these are loose by orders of
    magnitude; NMS and thresholds are decided on the host from the same float32 values)."""
    names = sorted(os.listdir(PHOTOS_DIR)) if device == "cuda" else SELF_CHECK_PHOTOS
    images = [load_rgb(PHOTOS_DIR / n) for n in names]
    want = M.MTCNN(device="cpu").detect(images)
    got = M.MTCNN(device=device).detect(images)
    problems, total = [], 0
    for name, w, g in zip(names, want, got):
        problems += [f"{name}: CPU {p}" for p in unmatched_faces(w, g, near=1e-3)]
        problems += [f"{name}: {device} {p}" for p in unmatched_faces(g, w, near=1e-3)]
        total += len(w)
    assert not problems, problems[:10]
    assert total >= (100 if device == "cuda" else 2)            # the group photos alone hold more than 100 faces


# ------------------------------------------------------------------------------------------- SWD and MS-SSIM

def _relative(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-12)


@pytest.mark.parametrize("device", BOTH)
def test_swd_and_msssim_match_the_cpu(device):
    """SWD (every level and the average; two disjoint sets of real faces) and MS-SSIM (every pair: a face and the
    same face with noise +-20) on `device` against the CPU, at 64 px on CUDA, 32 px on the self-check: within 1e-4
    relative. The random choices (centres,
    directions) are drawn on the host, the same for both; the CPU does its GEMMs and sorts in numpy, CUDA in torch,
    both fp32 (PyTorch's matmuls are not TF32 by default, asserted here: that is what evaluate runs with)."""
    assert not torch.backends.cuda.matmul.allow_tf32
    n, res = (256, 64) if device == "cuda" else (48, 32)
    a, b = celeba_faces(n, res), celeba_faces(n, res, start=n)
    opts = dict(descriptors_per_image=32 if device == "cpu" else 128, directions=64, repeats=2, seed=0)
    want, got = swd.swd(a, b, device="cpu", **opts), swd.swd(a, b, device=device, **opts)
    assert set(want) == set(got) and len(want) >= 3
    off = {k: _relative(got[k], want[k]) for k in want}
    assert max(off.values()) <= 1e-4, {k: (got[k], want[k]) for k in want}
    pairs = 64 if device == "cuda" else 16
    noisy = np.clip(a[:pairs] + np.random.default_rng(0).integers(-20, 21, a[:pairs].shape), 0, 255).astype(np.uint8)
    m_want = msssim.msssim_per_pair(a[:pairs], noisy, "cpu").numpy()           # a face against itself with noise:
    m_got = msssim.msssim_per_pair(a[:pairs], noisy, device).numpy()           # no scale clipped to 0
    assert (m_want > 0.05).all() and (m_want < 0.999).all(), m_want
    np.testing.assert_allclose(m_got, m_want, rtol=1e-4, atol=0)
    if device == "cpu":
        assert got == want and np.array_equal(m_got, m_want)


# ----------------------------------------------------------------------------------------------- FID features

@pytest.fixture(scope="module")
def inception_bytes() -> bytes:
    """torch-fidelity's real Inception network with random He-normal weights (helpers.random_inception_weights: the
    published weights cannot be downloaded in tests; torch's default init would shrink the features to ~1e-8)."""
    return random_inception_weights()


def features_of(images: np.ndarray, data_bytes: bytes, device: str) -> fid.FeatureSet:
    net = inception.network_from_bytes(data_bytes, device)          # the real loading path, as evaluate's
    into = fid.FeatureSet(len(images), keep_features=True, keep_logits=True, device=device)
    fid.extract(net, images, into, batch=16, device=device)
    return into


@pytest.mark.parametrize("device", BOTH)
def test_fid_features_match_the_cpu(device, inception_bytes):
    """The Inception pool features, logits and the FID statistics (mean, covariance) of real faces (64 px, resized
    to 299 inside the network) on `device` against the CPU: within 1e-4 of each quantity's largest magnitude
    (random weights give features of arbitrary scale). fid.extract runs cuDNN in full fp32 (TF32 off), as the
    reference TF graph; with TF32 the features move by ~1e-3."""
    images = celeba_faces(32 if device == "cuda" else 2, 64)
    want, got = features_of(images, inception_bytes, "cpu"), features_of(images, inception_bytes, device)
    for name, w, g in (("features", want.kept_features(), got.kept_features()),
                       ("logits", want.kept_logits(), got.kept_logits())):
        scale = float(np.abs(w).max())
        assert scale > 0 and np.isfinite(g).all(), name
        assert float(np.abs(g - w).max()) <= 1e-4 * scale, (name, float(np.abs(g - w).max()), scale)
    if len(images) > 2:
        for name, w, g in (("mean", want.mean(), got.mean()), ("cov", want.cov(), got.cov())):
            assert float(np.abs(g - w).max()) <= 1e-4 * float(np.abs(w).max()), name
    if device == "cpu":
        assert np.array_equal(got.kept_features(), want.kept_features())


# ------------------------------------------------------------------------------------- the tiny DAG, end to end

@pytest.mark.slow
@pytest.mark.gpu
@needs_cuda
def test_snakemake_dag_on_the_gpu(faces, tmp_path):  # noqa: F811 (faces: the fixture of test_simulated_devices)
    """The whole tiny DAG through the real `snakemake --cores 2 --resources gpu=1` with `train.gpus: auto` on the
    first GPU (tests/test_simulated_devices.py runs the same checks with a simulated device): every GPU job (crop,
    train, evaluate) leases the device once, training and evaluation run on CUDA, the checkpoints load on the CPU,
    and the final G_ema gives the same images on CUDA (fp32: cuDNN's TF32 off) and on the CPU: uint8, at most 1
    level apart, in under 1% of the values (a value within rounding of a level's edge may fall either side)."""
    device = first_devices(1)
    ws, logs = run_dag_on_one_device(faces, tmp_path, device)
    for r in (4, 8):
        assert f"train {r} px on cuda x1" in logs[f"train_{r}"], logs[f"train_{r}"][-2000:]
        assert f"evaluate {r}px on cuda" in logs[f"evaluate_{r}"], logs[f"evaluate_{r}"][-2000:]
        assert json.loads((ws / paths.train_json(r)).read_text())["device"] == "cuda"
    ckpt = ws / paths.checkpoint(8)
    on_cpu = progan.load_generator(ckpt, device="cpu").sample(16, seed=0)
    with tf32(False):
        on_gpu = progan.load_generator(ckpt, device="cuda").sample(16, seed=0)
    diff = np.abs(on_cpu.astype(int) - on_gpu.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


# ------------------------------------------------------------------------------------------ CUDA out of memory

CAPPED_CLI = """import sys, torch
from progan import cli
from progan.train import loop
real = loop.training_loop
def capped(*args, **kwargs):   # a 256 MiB device: the huge batch fails in a real CUDA allocation, not in host RAM
    torch.cuda.set_per_process_memory_fraction(min(1.0, 2**28 / torch.cuda.get_device_properties(0).total_memory))
    return real(*args, **kwargs)
loop.training_loop = capped
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.gpu
@needs_cuda
def test_cuda_out_of_memory_is_one_line_naming_the_batch(tmp_path):
    """`progan train --res 4` with train.stages.4.batch 2^18 on a GPU capped at 256 MiB
    (torch.cuda.set_per_process_memory_fraction, so that the batch overflowing it stays small on the host: G's
    first dense layer's output alone is 256 MiB): a real torch.cuda.OutOfMemoryError from the caching allocator
    becomes our one-line message naming the param and its value, exit status 1, no traceback, no checkpoint."""
    batch = 2**18
    params_path = make_project(tmp_path, stages={"4": _stage(batch, 0, batch / 1000), "8": _stage(8, 0.05, 0.05)},
                               mlflow__tracking_uri=NO_MLFLOW)
    proc = subprocess.run([sys.executable, "-c", CAPPED_CLI, "train", "--res", "4", "--params", str(params_path)],
                          cwd=tmp_path, env=gpu_env(tmp_path, first_devices(1)), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert re.fullmatch(
        r"progan train: error: train 4 px at stage kimg 0\.000 \(stabilize\): CUDA out of memory \(Tried to allocate "
        r"[\d.]+ [KMG]iB\); lower train\.stages\.4\.batch \(now 262144\) in params\.yaml and run `progan train --res "
        r"4` again; no snapshot yet; the stage restarts from scratch", line), line
    assert proc.stderr.count("progan train: error:") == 1
    assert not (tmp_path / paths.checkpoint(4)).exists()


# ----------------------------------------------------------------------------------------- resume on CUDA

@pytest.mark.gpu
@needs_cuda
def test_a_killed_stage_resumes_on_cuda(tmp_path):
    """Kill `progan train --res 8` on CUDA once, right after its first snapshot, and run it again: it resumes from
    the snapshot and completes, and the checkpoint loads on the CPU (weights_only). What holds on CUDA: the same
    schedule to the image (cur_nimg, total_kimg, alpha, the losses.tsv rows' kimg, phase and alpha), the loss rows
    of the killed run kept verbatim up to the snapshot, the resumed run's first tick equal to the uninterrupted
    run's within 5% (+0.05: the weights differ by rounding drift only), finite weights. Bit-identity with the uninterrupted run is a CPU promise
    (tests/test_resume.py): on CUDA some backward kernels (nearest upsampling) add in a varying order even with
    train.deterministic, so the weights drift by rounding; the largest difference is printed."""
    stages = {**STAGES, "8": _stage(8, 1.0, 1.0)}                  # 250 minibatches: the kill lands mid-stage
    params_path = make_project(tmp_path, stages=stages, mlflow__tracking_uri=NO_MLFLOW)
    env = gpu_env(tmp_path, first_devices(1))

    def train(res):
        return subprocess.run(progan_cmd("train", "--res", str(res), "--params", str(params_path)), cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)

    for res in (4, 8):
        done = train(res)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"train {res} px on cuda x1" in done.stderr
    ref = tmp_path / "ref8"
    shutil.move(tmp_path / "results" / "8", ref)

    snap = tmp_path / paths.resume_dir(8) / "snapshot.pt"
    kill_when_file_exists(progan_cmd("train", "--res", "8", "--params", str(params_path)), snap, env=env, cwd=tmp_path,
                          timeout_s=RUN_TIMEOUT_S)
    assert snap.is_file() and not (tmp_path / paths.checkpoint(8)).exists(), "killed too late: the stage had finished"
    snapshot = torch.load(snap, weights_only=True)
    snap_kimg, snap_rows = snapshot["cur_nimg"] / 1000, snapshot["rows"]

    resumed = train(8)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from results/8/.resume/snapshot.pt at stage kimg {snap_kimg:.1f}" in resumed.stderr
    assert not (tmp_path / paths.resume_dir(8)).exists()
    a = torch.load(ref / "checkpoint.pt", weights_only=True, map_location="cpu")
    b = torch.load(tmp_path / paths.checkpoint(8), weights_only=True, map_location="cpu")
    assert set(a) == set(b)
    for key in ("cur_nimg", "total_kimg", "alpha", "res_px", "prev_checkpoint_sha256"):
        assert a[key] == b[key], key
    worst = 0.0
    for net in ("G", "D", "G_ema"):
        assert set(a[net]) == set(b[net])
        for k, v in b[net].items():
            assert torch.isfinite(v).all(), f"{net}.{k}"
            worst = max(worst, float((v.float() - a[net][k].float()).abs().max()))
    print(f"resumed on CUDA vs uninterrupted: largest weight difference {worst:.3g}"
          f"{' (bit-identical)' if worst == 0 else ''} (not asserted: see the docstring)")
    ref_rows, rows = _loss_columns(ref / "losses.tsv"), _loss_columns(tmp_path / paths.losses_tsv(8))
    assert len(rows) == len(ref_rows) and rows[0] == ref_rows[0]                     # header
    schedule_cols = [rows[0].index(c) for c in ("total_kimg", "stage_kimg", "phase", "alpha")]
    assert [[r[i] for i in schedule_cols] for r in rows] == [[r[i] for i in schedule_cols] for r in ref_rows]
    kept = len(snap_rows)
    assert kept >= 1
    tsv = (tmp_path / paths.losses_tsv(8)).read_text().splitlines()
    assert tsv[:1 + kept] == loop.losses_tsv_text(snap_rows).splitlines()              # the killed run's rows
    first_resumed, first_ref = rows[1 + kept], ref_rows[1 + kept]
    loss_cols = [rows[0].index(c) for c in ("d_loss", "g_loss", "d_real", "d_fake")]
    for i in loss_cols:
        assert abs(float(first_resumed[i]) - float(first_ref[i])) <= 0.05 * (1 + abs(float(first_ref[i]))), \
            (rows[0][i], first_resumed[i], first_ref[i])
    info = json.loads((tmp_path / paths.train_json(8)).read_text())
    assert info["device"] == "cuda" and info["resumed_from_kimg"] == snap_kimg


# ---------------------------------------------------------------------------------------- torchrun on NCCL

@pytest.mark.gpu
@needs_cuda
@needs_two
def test_two_gpu_stage_under_torchrun_on_nccl(tmp_path):
    """train.gpus 2 on two real GPUs: one lease of both, torchrun with 2 workers joined over NCCL (dist.init), rank
    0 alone writes; the checkpoint loads on the CPU and says 2 GPUs on CUDA."""
    params_path = make_project(tmp_path, mlflow__tracking_uri=NO_MLFLOW, train__gpus=2)
    proc = subprocess.run(progan_cmd("train", "--res", "4", "--params", str(params_path)), cwd=tmp_path,
                          env=gpu_env(tmp_path, first_devices(2)), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "launching 2 workers" in proc.stderr and proc.stderr.count("train 4 px: done") == 1
    assert "train 4 px on cuda x2" in proc.stderr
    info = json.loads((tmp_path / paths.train_json(4)).read_text())
    assert info["gpus"] == 2 and info["device"] == "cuda"
    ckpt = torch.load(tmp_path / paths.checkpoint(4), weights_only=True, map_location="cpu")
    assert ckpt["res_px"] == 4 and all(torch.isfinite(v).all() for v in ckpt["G"].values())
