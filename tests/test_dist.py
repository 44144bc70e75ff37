"""Multi-GPU logic on CPU: 2 gloo processes doing one training step equal one process on the same global batch.

Alignment: the global batch of 16 is split rows rank::2 (data.py), and minibatch stddev groups are strided
(sample n in group n % M, official networks.py), so with group size 4 each rank's two groups are exactly two
of the single process's four groups. Latents and gradient-penalty factors are drawn for the global batch and
sliced the same way, so the only difference left is float summation order.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from progan import params as params_mod, paths
from progan.model.networks import Discriminator, Generator, ModelConfig, fade_reals
from progan.train import data, dist, nets as nets_mod, step

from test_train import NO_MLFLOW, make_project

GLOBAL_BATCH, RES, ALPHA = 16, 8, 0.5


def _setup(params_path):
    """Identical nets, optimizers and global inputs in every process (CPU, seeded)."""
    p = params_mod.load(params_path)
    cfg = ModelConfig.from_params(p)
    torch.manual_seed(0)
    G, D = Generator(cfg, RES), Discriminator(cfg, RES)
    nets = nets_mod.Nets(G, D, copy.deepcopy(G).requires_grad_(False), cfg, None, None, [])
    adam = nets_mod.Adam.from_params(p, RES)
    opt_G, opt_D = adam.make(G), adam.make(D)
    images = data.open_level(RES)
    idx, flip = data.Sampler(len(images), p.seed, RES, True).indices(0, GLOBAL_BATCH)
    reals = fade_reals(data.to_device(torch.from_numpy(data.read_batch(images, idx)), torch.from_numpy(flip),
                                      torch.device("cpu")), ALPHA)
    z_d = step.latents(p.seed, RES, 0, 2, GLOBAL_BATCH, cfg.latent_dim)
    z_g = step.latents(p.seed, RES, 0, 3, GLOBAL_BATCH, cfg.latent_dim)
    mix = step.gp_mix(p.seed, RES, 0, GLOBAL_BATCH)
    return p, nets, opt_G, opt_D, (reals, z_d, z_g, mix)


def _step(params_path, rank, world):
    p, nets, opt_G, opt_D, inputs = _setup(params_path)
    rows = [x[rank::world] for x in inputs]
    settings = step.Settings(p.train.loss, p.train.gp_weight, p.train.drift_weight, p.train.ema_decay)
    stats = step.train_step(nets, opt_G, opt_D, step.StepInputs(*rows, ALPHA), settings, world)
    return nets, dist.all_reduce_mean(stats, world)


def _worker(rank, world, root, init_file):
    torch.set_num_threads(1)
    os.chdir(root)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        nets, stats = _step(Path(root) / "params.yaml", rank, world)
        if rank == 0:
            torch.save({"G": nets.G.state_dict(), "D": nets.D.state_dict(), "G_ema": nets.G_ema.state_dict(),
                        "stats": stats}, Path(root) / "rank0.pt")
    finally:
        torch_dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path, monkeypatch):
    params_path = make_project(tmp_path, mlflow__tracking_uri=NO_MLFLOW)
    assert params_mod.load(params_path).model.mbstd_group_size == 4
    mp.spawn(_worker, args=(2, str(tmp_path), str(tmp_path / "pg_init")), nprocs=2, join=True)
    two = torch.load(tmp_path / "rank0.pt", weights_only=True)

    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        nets, stats = _step(params_path, 0, 1)
        _, nets0, *_ = _setup(params_path)
    finally:
        torch.set_num_threads(before)
    # Loss statistics of the step: mean over ranks == mean over the global batch.
    torch.testing.assert_close(two["stats"], stats, rtol=1e-5, atol=1e-6)
    moved = 0
    for name in ("G", "D", "G_ema"):
        one = getattr(nets, name).state_dict()
        init = getattr(nets0, name).state_dict()
        for k, v in one.items():
            # Adam's first step with beta1 = 0 is ~lr * sign(grad): params match to float rounding.
            torch.testing.assert_close(two[name][k], v, rtol=1e-5, atol=1e-6, msg=f"{name}.{k}")
            moved += int(not torch.equal(v, init[k]))
    assert moved > 10                                  # the step really changed the weights


def test_average_gradients_is_identity_on_one_rank():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    dist.average_gradients([p, torch.nn.Parameter(torch.zeros(1))], world=1)
    assert p.grad.tolist() == [1.0, 2.0, 3.0]


def test_torchrun_command():
    class P:
        path = Path("/x/params.yaml")
    cmd = dist.torchrun_command(P, 16, 4)
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                   "-m", "progan.cli", "train", "--res", "16", "--params", "/x/params.yaml"]


@pytest.mark.slow
def test_whole_stage_under_torchrun_on_cpu(tmp_path):
    """The real launch path: torchrun with 2 gloo workers on CPU; rank 0 alone writes the files."""
    params_path = make_project(tmp_path, mlflow__tracking_uri=NO_MLFLOW)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": NO_MLFLOW}
    r = subprocess.run(dist.torchrun_command(params_mod.load(params_path), 4, 2), env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(tmp_path / paths.checkpoint(4), weights_only=True)
    assert ck["cur_nimg"] == 104
    assert (tmp_path / paths.losses_tsv(4)).read_text().count("\n") == 3
    assert r.stderr.count("train 4 px: done") == 1
