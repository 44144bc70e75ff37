"""Multi-GPU training: how many GPUs, the torchrun launch, and gradient averaging without DDP.

Data parallel like the official code (`train.py`: reals split over GPUs, gradients averaged by the
optimizer): each rank runs G and D on its slice of the global minibatch (rows rank::world, see data.py),
so minibatch-stddev groups stay inside a rank. The gradient penalty needs a double backward, which
DDP's hooks handle poorly with create_graph; the networks are therefore NOT wrapped in DDP: after each
backward the gradients are flattened into one buffer, all-reduced and divided by world size.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from progan.errors import ProganError
from progan.log import log


def in_launched_worker() -> bool:
    """True inside a process started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def torchrun_command(params, res_px: int, nproc: int) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m progan.cli train --res R --params P` (torchrun is
    `python -m torch.distributed.run`; calling it through this interpreter avoids PATH surprises)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "progan.cli", "train", "--res", str(res_px), "--params", str(params.path)]


def launch(params, res_px: int, nproc: int) -> None:
    """Run the stage as `nproc` torchrun workers (no shell) and wait; a failed worker is a ProganError."""
    cmd = torchrun_command(params, res_px, nproc)
    log.info("train %d px: launching %d workers: %s", res_px, nproc, " ".join(cmd))
    rc = subprocess.run(cmd, check=False).returncode
    if rc != 0:
        raise ProganError(f"progan train --res {res_px}: the {nproc} torchrun workers failed (exit {rc}); "
                          f"see the log above, then run the same command again to resume from the last snapshot")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(use_cuda: bool) -> DistEnv:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo on CPU); else a 1-rank env."""
    if not in_launched_worker():
        return DistEnv(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistEnv(torch_dist.get_rank(), torch_dist.get_world_size(), device)


def shutdown(env: DistEnv) -> None:
    if env.world > 1 and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def average_gradients(params, world: int) -> None:
    """All-reduce (mean) the .grad of `params` through one flat buffer. Parameters without a gradient are
    skipped; every rank has the same ones (same alpha, same graph), so the buffers line up."""
    if world <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
    flat.div_(world)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def all_reduce_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    """Mean of a tensor over ranks (for per-tick loss statistics); identity on one rank."""
    if world <= 1:
        return t
    t = t.clone()
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t / world


def barrier(env: DistEnv) -> None:
    if env.world > 1:
        torch_dist.barrier()


def broadcast_object(obj, env: DistEnv):
    """Rank 0's value of a small picklable object on every rank."""
    if env.world <= 1:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, env: DistEnv) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (RNG states for the snapshot)."""
    if env.world <= 1:
        return [obj]
    out = [None] * env.world
    torch_dist.all_gather_object(out, obj)
    return out
