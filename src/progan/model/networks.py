"""ProGAN generator and discriminator (Karras et al. 2017, Table 2), after the official `G_paper` / `D_paper`
in tkarras/progressive_growing_of_gans `networks.py`.

A net built for `res_px` holds every block 4..res_px and a toRGB (G) / fromRGB (D) for EVERY resolution,
keyed by resolution in `nn.ModuleDict`s (`blocks.4`, `blocks.8`, `to_rgb.4`, ...), so the state dict of the
res/2 net is a subset of the res one (`load_grown`). `alpha` in [0, 1] fades in the top block (paper §2,
Fig. 2; 1 = fully grown), which the official code expresses as `lod`: alpha = 1 - (lod_in - lod).

Alpha may be a Python number (1.0 skips the fading-out branch) or a 0-dim tensor (both branches always
computed: no recompiles under torch.compile as alpha changes). Values outside [0, 1] are clipped (lerp_clip).

`fused_scale` (official G_paper / D_paper argument, networks.py L160, L245; default true) is a ModelConfig field:
true, D's blocks add the bias and apply the LReLU after the 2x2 pooling (`Conv1_down`, L269-271); false, before it
(`Conv1` then `downscale2d`, L272-275), which is also the Theano code's order (network.py@2609d1f D_paper:
WScaleLayer's bias and lrelu, then Downscale2DLayer) and the paper's Table 2. In G it changes only how the same
linear map is computed (`Conv0_up` fused transposed conv, or `upscale2d` + `Conv0`, L190-196).
The official feature switches (config.py L109-116 "Disable individual features") are ModelConfig fields, each the
official argument it mirrors: `pixel_norm` (G_paper use_pixelnorm: G's PN after every conv; the latents are still
normalised, normalize_latents), `equalized_lr` (use_wscale, G and D), `leaky_relu` (G_paper use_leakyrelu: ReLU in
G; D_paper always uses leaky ReLU, L254), `mbstd_group_size` 0 (D_paper: no stddev layer, L243, L277).
Deviations from the official code (all flagged where they happen):
- the fused up/down convs build their 4x4 kernel so they equal upsample+conv3x3 / conv3x3+pool with the SAME
  3x3 weight (see layers.UpConv2d);
- the toRGB/fromRGB layers below res/2 are kept (never used in forward) so the state dicts nest; with DDP
  this needs `find_unused_parameters=True` or excluding them.
Pure nn code: the files these nets are saved in and read from are progan/checkpoint.py's.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from progan.errors import ProganError
from progan.model.layers import (SQRT2, ConvDown2d, EqualizedConv2d, EqualizedLinear, UpConv2d, downsample2x,
                                 identity, leaky_relu, minibatch_stddev, pixel_norm, relu, upsample2x)

MAX_RES_PX = 1024
MAX_WIDTH = 16384           # model.latent_dim and model.fmap_max (32x the official 512): a file edited to 10^9 would
                            # ask for terabytes at the first layer


def _check_res(res_px: int, minimum: int = 4) -> int:
    try:
        res = operator.index(res_px)            # ints and numpy ints; not floats or bools
    except TypeError:
        res = 0
    if isinstance(res_px, bool) or res < minimum or res > MAX_RES_PX or res & (res - 1):
        raise ProganError(f"resolution must be a power of two in [{minimum}, {MAX_RES_PX}] px, got {res_px!r}")
    return res


def _resolutions(res_px: int) -> list[int]:
    return [2**k for k in range(2, res_px.bit_length())]    # 4, 8, ..., res_px


@dataclass(frozen=True)
class ModelConfig:
    latent_dim: int = 512        # paper: 512 (official latent_size = nf(0))
    fmap_base: int = 8192        # official fmap_base: nf(stage) = min(fmap_base / 2^stage, fmap_max)
    fmap_max: int = 512
    mbstd_group_size: int = 4    # official D_paper default; 0 or 1 disables the layer (official `if > 1`, L277)
    num_channels: int = 3
    pixel_norm: bool = True      # official G_paper use_pixelnorm (networks.py L156); -nopixelnorm (config.py L111)
    equalized_lr: bool = True    # official use_wscale of G_paper / D_paper (L155, L242); -nowscale (config.py L112)
    leaky_relu: bool = True      # official G_paper use_leakyrelu (L158); -noleakyrelu (config.py L113): ReLU in G
    fused_scale: bool = True     # official G_paper / D_paper fused_scale (L160, L245): D's bias + LReLU after the pool

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in (bool, "bool"):
                if not isinstance(value, bool):
                    raise ProganError(f"model.{f.name} must be true or false, got {value!r}")
                continue
            low = 0 if f.name == "mbstd_group_size" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ProganError(f"model.{f.name} must be an integer >= {low}, got {value!r}")
            if f.name in ("latent_dim", "fmap_max") and value > MAX_WIDTH:      # the schema's maximum too
                raise ProganError(f"model.{f.name} must be at most {MAX_WIDTH} (32x the official 512), got {value}")

    @classmethod
    def from_params(cls, params) -> "ModelConfig":
        m = params.model
        return cls(latent_dim=int(m.latent_dim), fmap_base=int(m.fmap_base), fmap_max=int(m.fmap_max),
                   mbstd_group_size=int(m.mbstd_group_size), pixel_norm=bool(m.pixel_norm),
                   equalized_lr=bool(m.equalized_lr), leaky_relu=bool(m.leaky_relu),
                   fused_scale=bool(m.fused_scale))

    @property
    def g_act(self):
        """G's activation: leaky ReLU 0.2, or ReLU (official G_paper `act`, L171)."""
        return leaky_relu if self.leaky_relu else relu

    @property
    def g_norm(self):
        """G's PN after each activation: pixel_norm, or nothing (official G_paper `PN`, L168)."""
        return pixel_norm if self.pixel_norm else identity

    def nf(self, res_px: int) -> int:
        """Feature maps at `res_px` (official `nf(stage)` with stage = log2(res_px) - 1; res_px 2 = stage 0)."""
        stage = _check_res(res_px, minimum=2).bit_length() - 2
        n = min(int(self.fmap_base / 2.0**stage), self.fmap_max)
        if n < 1:
            raise ProganError(f"model.fmap_base {self.fmap_base} gives 0 feature maps at {res_px} px; "
                              f"raise model.fmap_base to at least {2**stage}")
        return n


def _fade_weight(alpha: float | Tensor) -> float | Tensor | None:
    """Clip alpha to [0, 1] like the official `lerp_clip`; None means fully grown (skip the old branch)."""
    if isinstance(alpha, Tensor):
        return alpha.clamp(0.0, 1.0)
    a = float(alpha)
    if math.isnan(a):
        raise ProganError("fade-in alpha is NaN")
    a = min(max(a, 0.0), 1.0)
    return None if a == 1.0 else a


def _lerp(old: Tensor, new: Tensor, weight: float | Tensor) -> Tensor:
    """old + (new - old) * weight; weight 0 returns `old` bit-exactly (torch.lerp)."""
    new = new.to(old.dtype)
    if isinstance(weight, Tensor):
        weight = weight.to(device=old.device, dtype=old.dtype)
    return torch.lerp(old, new, weight)


def fade_reals(x: Tensor, alpha: float | Tensor) -> Tensor:
    """Blend reals with their 2x-blurred version during a fade-in (official train.py `process_reals`):
    lerp(upsample(avgpool2(x)), x, alpha). [N, C, H, W] -> same; alpha 1 returns x unchanged."""
    w = _fade_weight(alpha)
    if w is None:
        return x
    return _lerp(upsample2x(downsample2x(x)), x, w)


# ---------------------------------------------------------------------------------------------- generator

class _GFirstBlock(nn.Module):
    """4x4: PN(z) -> dense to nf*16 -> reshape [N, nf, 4, 4] -> +bias -> LReLU -> PN -> conv3x3 -> LReLU -> PN.
    The latents are always normalised (official normalize_latents); the other PNs and the LReLUs follow `cfg`."""

    def __init__(self, cfg: ModelConfig, nf: int):
        super().__init__()
        self.nf, self.act, self.norm = nf, cfg.g_act, cfg.g_norm
        # official G_paper: gain=np.sqrt(2)/4 "to match the original Theano implementation"
        self.dense = EqualizedLinear(cfg.latent_dim, nf * 16, gain=SQRT2 / 4, bias=False, equalized=cfg.equalized_lr)
        self.dense_bias = nn.Parameter(torch.zeros(nf))    # official apply_bias after the reshape: per channel
        self.conv = EqualizedConv2d(nf, nf, 3, equalized=cfg.equalized_lr)

    def forward(self, z: Tensor) -> Tensor:
        x = self.dense(pixel_norm(z)).view(-1, self.nf, 4, 4)          # [N, nf, 4, 4]
        x = self.norm(self.act(x + self.dense_bias.to(x.dtype).view(1, -1, 1, 1)))
        return self.norm(self.act(self.conv(x)))


class _GBlock(nn.Module):
    """8x8 and up: upsample -> conv3x3 -> LReLU -> PN -> conv3x3 -> LReLU -> PN (upsample fused into conv0 when
    cfg.fused_scale, official Conv0_up; else upscale2d + Conv0: the same function, networks.py L190-196)."""

    def __init__(self, cfg: ModelConfig, in_nf: int, nf: int):
        super().__init__()
        self.act, self.norm = cfg.g_act, cfg.g_norm
        self.conv0 = UpConv2d(in_nf, nf, equalized=cfg.equalized_lr, fused=cfg.fused_scale)
        self.conv1 = EqualizedConv2d(nf, nf, 3, equalized=cfg.equalized_lr)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.act(self.conv0(x)))                          # [N, nf, 2H, 2W]
        return self.norm(self.act(self.conv1(x)))


class Generator(nn.Module):
    """[N, latent_dim] latents -> [N, num_channels, res_px, res_px] images (linear output, no tanh)."""

    def __init__(self, cfg: ModelConfig, res_px: int):
        super().__init__()
        self.cfg = cfg
        self.res_px = _check_res(res_px)
        self.blocks = nn.ModuleDict()
        self.to_rgb = nn.ModuleDict()
        # Interleaved creation order: with the same seed, the 4..R/2 weights of G(R) equal those of G(R/2).
        for res in _resolutions(self.res_px):
            if res == 4:
                self.blocks["4"] = _GFirstBlock(cfg, cfg.nf(4))
            else:
                self.blocks[str(res)] = _GBlock(cfg, cfg.nf(res // 2), cfg.nf(res))
            self.to_rgb[str(res)] = EqualizedConv2d(cfg.nf(res), cfg.num_channels, 1, gain=1.0,   # official ToRGB gain 1
                                                    equalized=cfg.equalized_lr)

    def forward(self, z: Tensor, alpha: float | Tensor = 1.0) -> Tensor:
        if z.ndim != 2 or z.shape[1] != self.cfg.latent_dim:
            raise ProganError(f"Generator expects latents [N, {self.cfg.latent_dim}], got {list(z.shape)}")
        top = self.res_px
        h = self.blocks["4"](z)
        for res in _resolutions(top)[1:-1]:
            h = self.blocks[str(res)](h)                                # up to res/2: [N, nf, R/2, R/2]
        if top == 4:
            return self.to_rgb["4"](h)
        new = self.to_rgb[str(top)](self.blocks[str(top)](h))          # [N, C, R, R]
        w = _fade_weight(alpha)
        if w is None:
            return new
        old = upsample2x(self.to_rgb[str(top // 2)](h))                 # official Grow_lod: upscale2d(torgb(x))
        return _lerp(old, new, w)


# ------------------------------------------------------------------------------------------ discriminator

class _DLastBlock(nn.Module):
    """4x4: minibatch stddev -> conv3x3 -> LReLU -> dense to nf(stage 0) -> LReLU -> dense to 1 (gain 1)."""

    def __init__(self, nf: int, nf_dense: int, mbstd_group_size: int, equalized: bool = True):
        super().__init__()
        self.mbstd_group_size = mbstd_group_size
        extra = 1 if mbstd_group_size > 1 else 0                        # official: `if mbstd_group_size > 1`
        self.conv = EqualizedConv2d(nf + extra, nf, 3, equalized=equalized)
        self.dense0 = EqualizedLinear(nf * 16, nf_dense, equalized=equalized)   # official Dense0: nf(res - 2) = nf(0)
        self.dense1 = EqualizedLinear(nf_dense, 1, gain=1.0, equalized=equalized)   # official Dense1 gain=1

    def forward(self, x: Tensor, parts: int = 1) -> Tensor:
        if self.mbstd_group_size > 1:
            x = minibatch_stddev(x, self.mbstd_group_size, parts)      # [N, nf + 1, 4, 4]
        x = leaky_relu(self.conv(x))
        x = leaky_relu(self.dense0(x.flatten(1)))                       # NCHW flatten order, as tf.reshape
        return self.dense1(x)                                           # [N, 1]


class _DBlock(nn.Module):
    """8x8 and up: conv3x3 -> LReLU -> conv3x3 and the 2x2 avg pool, in the order `fused` says.

    fused (official default `fused_scale=True`, `Conv1_down`, networks.py L269-271): conv and pool fused, the bias
    and LReLU AFTER the pooling. Not fused (official `fused_scale=False`, `Conv1` + `downscale2d`, L272-275; the
    Theano code's D_paper, network.py@2609d1f, and the paper's Table 2): bias and LReLU, then the pooling.
    """

    def __init__(self, nf: int, out_nf: int, equalized: bool = True, fused: bool = True):
        super().__init__()
        self.fused = fused
        self.conv0 = EqualizedConv2d(nf, nf, 3, equalized=equalized)
        self.conv1 = ConvDown2d(nf, out_nf, equalized=equalized)

    def forward(self, x: Tensor) -> Tensor:
        x = leaky_relu(self.conv0(x))
        if self.fused:
            return leaky_relu(self.conv1(x))                            # [N, out_nf, H/2, W/2]
        return downsample2x(leaky_relu(self.conv1.conv(x)))             # [N, out_nf, H/2, W/2]


class Discriminator(nn.Module):
    """[N, num_channels, res_px, res_px] images -> [N] scores (linear, no sigmoid).

    `parts`: x is that many equal minibatches stacked along dim 0, scored in one pass; the minibatch stddev is
    computed within each part (layers.minibatch_stddev), every other layer is per sample, so each part's scores
    are those of D on that part alone (train/step.py scores reals and fakes this way)."""

    def __init__(self, cfg: ModelConfig, res_px: int):
        super().__init__()
        self.cfg = cfg
        self.res_px = _check_res(res_px)
        self.blocks = nn.ModuleDict()
        self.from_rgb = nn.ModuleDict()
        for res in _resolutions(self.res_px):
            # official FromRGB: 1x1 conv, gain sqrt(2), then LReLU (applied in forward)
            self.from_rgb[str(res)] = EqualizedConv2d(cfg.num_channels, cfg.nf(res), 1, equalized=cfg.equalized_lr)
            if res == 4:
                self.blocks["4"] = _DLastBlock(cfg.nf(4), cfg.nf(2), cfg.mbstd_group_size, cfg.equalized_lr)
            else:
                self.blocks[str(res)] = _DBlock(cfg.nf(res), cfg.nf(res // 2), cfg.equalized_lr, cfg.fused_scale)

    def forward(self, x: Tensor, alpha: float | Tensor = 1.0, parts: int = 1) -> Tensor:
        top = self.res_px
        want = (self.cfg.num_channels, top, top)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ProganError(f"Discriminator expects images [N, {', '.join(map(str, want))}], got {list(x.shape)}")
        h = leaky_relu(self.from_rgb[str(top)](x))
        if top > 4:
            h = self.blocks[str(top)](h)                                # [N, nf(R/2), R/2, R/2]
            w = _fade_weight(alpha)
            if w is not None:
                old = leaky_relu(self.from_rgb[str(top // 2)](downsample2x(x)))
                h = _lerp(old, h, w)                                    # official Grow_lod: lerp on features
            for res in reversed(_resolutions(top)[1:-1]):
                h = self.blocks[str(res)](h)
        return self.blocks["4"](h, parts).squeeze(1)                    # [N]


# ------------------------------------------------------------------------------------------------- growing

def load_grown(net: nn.Module, prev_state: Mapping[str, Tensor]) -> list[str]:
    """Copy the state dict of the same kind of net at res/2 into `net` (at res); returns the new names.

    Every key of `prev_state` must exist in `net` with the same shape (ProganError otherwise: usually the
    model.* params changed between stages).
    """
    own = net.state_dict()
    kind = type(net).__name__
    unknown = [k for k in prev_state if k not in own]
    if unknown:
        raise ProganError(f"cannot grow the {kind}: the previous stage's state has {len(unknown)} keys this "
                          f"{kind} lacks (first: {unknown[0]}); was it saved from a {kind}?")
    for k, v in prev_state.items():
        if not isinstance(v, Tensor) or tuple(v.shape) != tuple(own[k].shape):
            got = list(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ProganError(f"cannot grow the {kind}: {k} has shape {got} in the previous stage but "
                              f"{list(own[k].shape)} here; were model.* params changed between stages?")
    with torch.no_grad():
        for k, v in prev_state.items():
            own[k].copy_(v)
    return [k for k in own if k not in prev_state]
