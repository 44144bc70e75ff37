"""The networks of one growth stage: G, D and G_ema at R, seeded, grown from the stage R/2 checkpoint, and Adam.

New layers of G_ema start as copies of G's new layers (official: Gs is cloned from G at construction; the grown
layers of both come from the same init). Adam has the paper's betas (0, 0.99) and eps 1e-8 (§A.1; official
G_opt / D_opt, config.py L45-46), fused: one kernel per step, and it honours `found_inf` (nonfinite.step_if_finite);
`reset_opt_each_phase` false (official `-noreset`, reset_opt_for_new_lod = False) carries its state across stages
by parameter name (train/state.py), and the new layers' first steps are those of the official never-reset Adam.
The first stage (train.start_px: 4, or crop.size without growing) starts from scratch, or from the G, D and G_ema of
`train.init_from` (a checkpoint of `progan import` or of a stage, at train.start_px, made with the same model.*:
checkpoint.load_init; fresh optimizers, its images counted from 0); every later one grows from the stage R/2
checkpoint, which must have been made with the same model.* and switches (checkpoint.check_grows_from).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import NamedTuple

import torch

from progan import checkpoint, paths
from progan.errors import ProganError
from progan.fileio import sha256_file
from progan.model.networks import Discriminator, Generator, ModelConfig, load_grown
from progan.train import state
from progan.train.schedule import stage_lrs
from progan.train.step import derive_seed


@dataclasses.dataclass
class Nets:
    G: torch.nn.Module
    D: torch.nn.Module
    G_ema: torch.nn.Module
    cfg: ModelConfig
    prev: dict | None              # the stage R/2 checkpoint (None at the first stage, train.start_px)
    prev_sha256: str | None        # its sha256; at the first stage, train.init_from's (None from scratch)
    grown_keys: list[str]          # G keys new at this resolution (G_ema copies them from G)
    source: str = "scratch"        # where the weights came from, for the log: scratch, the R/2 checkpoint, init_from


def build_networks(params, res: int) -> Nets:
    """G, D, G_ema at `res` on the CPU: seeded init, then the stage R/2 weights loaded with `load_grown`."""
    cfg = ModelConfig.from_params(params)
    torch.manual_seed(derive_seed(params.seed, res, 1))
    G, D = Generator(cfg, res), Discriminator(cfg, res)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    if res == params.start_px:
        if params.train.init_from is None:
            return Nets(G, D, G_ema, cfg, None, None, sorted(G.state_dict()))
        return _init_from(Path(params.root) / params.train.init_from, res, cfg, G, D, G_ema)   # relative: to the root
    prev_path = Path(paths.checkpoint(res // 2))
    prev = checkpoint.load_stage(prev_path, res // 2)
    checkpoint.check_grows_from(prev_path, prev, cfg, params)
    try:
        grown = load_grown(G, prev["G"])
        load_grown(D, prev["D"])
        grown_ema = load_grown(G_ema, prev["G_ema"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ProganError(f"{prev_path}: weights do not fit the {res} px networks ({str(e).splitlines()[0][:120]}); "
                          f"re-run `progan train --res {res // 2}`") from None
    g_state = G.state_dict()
    with torch.no_grad():
        for k in grown_ema:
            G_ema.state_dict()[k].copy_(g_state[k])
    return Nets(G, D, G_ema, cfg, prev, sha256_file(prev_path), sorted(grown), str(prev_path))


def _init_from(path: Path, res: int, cfg: ModelConfig, G, D, G_ema) -> Nets:
    """The first stage's networks from train.init_from (nothing is new: no grown keys)."""
    from progan.log import log

    init = checkpoint.load_init(path, res, cfg)
    for net, key in ((G, "G"), (D, "D"), (G_ema, "G_ema")):
        try:
            net.load_state_dict(init[key], strict=True)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise ProganError(f"train.init_from {path}: {key} does not fit the {res} px networks of model.* "
                              f"({str(e).strip().splitlines()[0][:120]}); was it written by another version?") from None
    digest = sha256_file(path)
    log.info("train %dpx: G, D and G_ema from train.init_from %s (sha256 %s)", res, path, digest[:12])
    return Nets(G, D, G_ema, cfg, None, digest, [], f"train.init_from {path}")


class Adam(NamedTuple):
    """The optimizer settings of a stage (train.stages.<R>.lr: G's, and D's unless `lr_D`; train.betas,
    train.adam_eps)."""
    lr: float
    betas: tuple[float, float]
    eps: float
    lr_D: float | None = None

    @classmethod
    def from_params(cls, params, res: int) -> "Adam":
        lr_G, lr_D = stage_lrs(params.stage(res).lr)
        return cls(lr_G, tuple(params.train.betas), params.train.adam_eps, lr_D)

    def make(self, net: torch.nn.Module, lr: float | None = None) -> torch.optim.Adam:
        return torch.optim.Adam(net.parameters(), lr=self.lr if lr is None else lr, betas=self.betas, eps=self.eps,
                                fused=True)

    def make_pair(self, G: torch.nn.Module, D: torch.nn.Module) -> tuple[torch.optim.Adam, torch.optim.Adam]:
        """(opt_G, opt_D) at their own learning rates."""
        return self.make(G, self.lr), self.make(D, self.lr if self.lr_D is None else self.lr_D)


def carry_optimizer_state(nets: Nets, res: int, opt_G, opt_D) -> None:
    """Load the stage R/2 Adam state into the stage R optimizers, matched by parameter name (train.reset_opt_each_phase
    false). New parameters start with zero moments at the optimizer's step count, as in the official run, where every
    layer exists from the start under one tf.train.AdamOptimizer whose bias correction counts all its steps."""
    prev_G, prev_D = Generator(nets.cfg, res // 2), Discriminator(nets.cfg, res // 2)
    for opt, prev_net, net, key in ((opt_G, prev_G, nets.G, "opt_G"), (opt_D, prev_D, nets.D, "opt_D")):
        opt.load_state_dict(state.remap_optimizer_state(nets.prev[key], [n for n, _ in prev_net.named_parameters()],
                                                        list(net.named_parameters())))
