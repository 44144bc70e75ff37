"""ProGAN building blocks (Karras et al. 2017), following tkarras/progressive_growing_of_gans `networks.py`.

- Equalized learning rate (paper §4.1): weights are stored N(0, 1) and multiplied at run time by the He
  constant gain / sqrt(fan_in) (official `get_weight(..., use_wscale=True)`); biases are not scaled, init 0.
  `equalized=False` is the official `use_wscale=False` (`-nowscale`, config.py L112): the same He constant is the
  init's standard deviation, N(0, gain^2 / fan_in), and nothing is scaled at run time (networks.py L22-29).
- Pixelwise feature vector normalization (paper §4.2, official `pixel_norm`).
- Minibatch standard deviation (paper §3, official `minibatch_stddev_layer`).
- Nearest 2x upsampling and 2x2 box downsampling (official `upscale2d` / `downscale2d`).

All ops are plain torch ops (no CPU-only paths): they run under CUDA bf16 autocast and channels_last.
The scale factors are Python floats, so nothing is allocated per call except the scaled weight.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from progan.errors import ProganError

SQRT2 = math.sqrt(2.0)
LRELU_SLOPE = 0.2       # official leaky_relu(alpha=0.2), both networks
PIXELNORM_EPS = 1e-8    # official G_paper pixelnorm_epsilon
MBSTD_EPS = 1e-8        # official minibatch_stddev_layer: sqrt(var + 1e-8)


def he_weight(shape: tuple[int, ...], fan_in: int, gain: float, equalized: bool) -> tuple[nn.Parameter, float]:
    """A weight and its run-time scale, as the official `get_weight` (networks.py L22-29): std = gain / sqrt(fan_in)
    (He init); equalized (use_wscale=True) stores N(0, 1) and scales by std at run time, else (use_wscale=False) it
    stores N(0, std^2) and the scale is 1. Both draw the same randn, so the two differ by the factor std alone."""
    std = gain / math.sqrt(fan_in)
    w = torch.randn(shape)
    if equalized:
        return nn.Parameter(w), std
    return nn.Parameter(w.mul_(std)), 1.0


class EqualizedConv2d(nn.Module):
    """Conv with 'same' padding, weight N(0,1) scaled by gain/sqrt(in*k*k) at run time (paper §4.1); with
    `equalized=False` a plain He-initialised conv (official use_wscale=False)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_px: int, gain: float = SQRT2,
                 equalized: bool = True):
        super().__init__()
        if kernel_px < 1 or kernel_px % 2 != 1:
            raise ValueError(f"kernel_px must be odd, got {kernel_px}")
        # official: fan_in = prod(shape[:-1]) = k * k * in (upscale2d_conv2d passes the same, networks.py L88)
        self.weight, self.scale = he_weight((out_channels, in_channels, kernel_px, kernel_px),
                                            in_channels * kernel_px * kernel_px, gain, equalized)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.padding = kernel_px // 2

    def scaled_weight(self) -> Tensor:
        return self.weight if self.scale == 1.0 else self.weight * self.scale

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.scaled_weight(), self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, kernel_px={k}, scale={self.scale:.6g}"


class EqualizedLinear(nn.Module):
    """Dense layer, weight N(0,1) scaled by gain/sqrt(in_features) at run time (paper §4.1).

    `bias=False` leaves the bias to the caller (G's 4x4 dense adds a per-channel bias after the reshape,
    as the official `G_paper` calls `apply_bias` after `tf.reshape`). `equalized=False`: plain He init.
    """

    def __init__(self, in_features: int, out_features: int, gain: float = SQRT2, bias: bool = True,
                 equalized: bool = True):
        super().__init__()
        self.weight, self.scale = he_weight((out_features, in_features), in_features, gain, equalized)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight if self.scale == 1.0 else self.weight * self.scale, self.bias)

    def extra_repr(self) -> str:
        o, i = self.weight.shape
        return f"{i}, {o}, bias={self.bias is not None}, scale={self.scale:.6g}"


def leaky_relu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, LRELU_SLOPE)


def relu(x: Tensor) -> Tensor:
    """G's activation with model.leaky_relu false (official G_paper `use_leakyrelu=False`: tf.nn.relu, L171)."""
    return F.relu(x)


def identity(x: Tensor) -> Tensor:
    """G's `PN` with model.pixel_norm false (official G_paper L168: `pixel_norm(x) if use_pixelnorm else x`)."""
    return x


def pixel_norm(x: Tensor, eps: float = PIXELNORM_EPS) -> Tensor:
    """b = a / sqrt(mean_c(a^2) + eps) over the channel axis (paper §4.2, eq. in §4.2; official `pixel_norm`).

    Works for [N, C] latents and [N, C, H, W] feature maps (dim 1 is the channel axis in both).
    """
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


def upsample2x(x: Tensor) -> Tensor:
    """Nearest-neighbour 2x upsampling [N, C, H, W] -> [N, C, 2H, 2W] (official `upscale2d`); exact copies."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def downsample2x(x: Tensor) -> Tensor:
    """2x2 box filter [N, C, H, W] -> [N, C, H/2, W/2] (official `downscale2d`, avg_pool VALID)."""
    return F.avg_pool2d(x, kernel_size=2, stride=2)


def minibatch_stddev(x: Tensor, group_size: int, parts: int = 1) -> Tensor:
    """Append one feature map: the stddev over each group of samples, averaged over C, H, W (paper §3).

    Follows the official `minibatch_stddev_layer` exactly: G = min(group_size, N); the batch is reshaped to
    [G, M, C, H, W], so sample n belongs to group n % M (strided groups, not consecutive ones); population
    variance over the group (divide by G), sqrt(var + 1e-8), mean over C, H, W, computed in >= fp32, then cast
    back and replicated over the group and pixels. [N, C, H, W] -> [N, C + 1, H, W].
    N must be divisible by G (the official code fails on the reshape otherwise); we raise ProganError.

    `parts` > 1: x is that many minibatches of N / parts samples stacked along dim 0 (the training step's one
    critic pass over reals, fakes and mixed images, train/step.py); each part gets exactly the layer it would get
    alone (N / parts in place of N above), so groups never mix samples of two parts.
    """
    total, c, h, w = x.shape
    if parts < 1 or total % parts:
        raise ProganError(f"minibatch stddev: a batch of {total} does not split into {parts} equal parts")
    n = total // parts                                   # samples per part
    g = min(group_size, n)
    if n % g != 0:
        raise ProganError(
            f"minibatch stddev: batch of {n} is not divisible by the group size {g}; use a per-device batch "
            f"that is a multiple of model.mbstd_group_size ({group_size}) or smaller than it")
    m = n // g
    y = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(parts, g, m, c, h, w)   # [PGMCHW], >= fp32
    y = y - y.mean(dim=1, keepdim=True)                  # subtract the group mean
    y = y.square().mean(dim=1)                           # [PMCHW] variance over the group
    y = (y + MBSTD_EPS).sqrt()                           # [PMCHW] stddev
    y = y.mean(dim=(2, 3, 4))                            # [PM] average over fmaps and pixels
    y = y.to(x.dtype).reshape(parts, 1, m, 1, 1, 1).expand(parts, g, m, 1, h, w).reshape(total, 1, h, w)  # [N1HW]
    return torch.cat([x, y], dim=1)


# The fused layers' 4x4 kernel from the 3x3 one, as the official code builds it (networks.py `upscale2d_conv2d`,
# `conv2d_downscale2d`: tf.pad by 1, then tf.add_n of the four shifted 4x4 slices): row i of the result sums rows
# i - 1 and i of the 3x3 (zero outside), i.e. k4 = A k3 A^T with A below, and vec(k4) = (A kron A) vec(k3).
_PAD_AND_SUM = ((1.0, 0.0, 0.0), (1.0, 1.0, 0.0), (0.0, 1.0, 1.0), (0.0, 0.0, 1.0))   # A [4, 3]


@functools.lru_cache(maxsize=64)
def _pad_and_sum_matrix(factor: float, flip: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[9, 16]: a flattened 3x3 kernel times it = `factor` x the official 4x4 kernel of (the spatially flipped, if
    `flip`) 3x3 kernel. Entries are 0 and `factor` (in `dtype`, as `weight * scale` rounds it): the equalized-lr
    scale folded in (times 1/4 for the pooling, exact). Made once per layer kind, dtype and device."""
    with torch.inference_mode(False):         # cached: a first call under inference_mode must not make it an
        a = torch.tensor(_PAD_AND_SUM, dtype=torch.float64)   # inference tensor (autograd could not save it later)
        if flip:
            a = a.flip(1)                                          # A flip(k) A^T: the flipped kernel's padded sum
        return (torch.kron(a, a) * factor).t().contiguous().to(device=device, dtype=dtype)


def _fused_kernel(weight: Tensor, factor: float, flip: bool = False) -> Tensor:
    """[O, I, 3, 3] weight -> [O, I, 4, 4] kernel in one GEMM [O*I, 9] @ [9, 16] (and one in the backward). The
    official construction written as pad + four slices + three sums is five passes over the weight each way
    (its backward fills four zeroed 5x5 copies): with the paper nets on the CPU the GEMM makes the whole training
    step 1.24x faster at 8 px and 1.19x at 16 px (bench/bench_train.py --kernel-ab, 2026-12-01, README). The same
    terms summed (each output is at most 4 of the 9 weights times `factor`), rounded differently in the last bit
    (the GEMM may fuse multiplies and adds, and orders the additions its own way); autocast off, so the kernel is
    built in the weight's precision as before (bf16 autocast casts it in the conv, as it did)."""
    o, i = weight.shape[:2]
    matrix = _pad_and_sum_matrix(factor, flip, weight.dtype, weight.device)
    with torch.autocast(weight.device.type, enabled=False):
        return (weight.reshape(o * i, 9) @ matrix).view(o, i, 4, 4)


class UpConv2d(EqualizedConv2d):
    """Nearest 2x upsample followed by a 3x3 equalized conv, fused into one stride-2 transposed conv.

    Official `G_paper` default `fused_scale=True` (`upscale2d_conv2d`): the 3x3 kernel is zero-padded to 5x5 and
    four shifted copies are summed into a 4x4 kernel, applied with conv_transpose stride 2. That costs 4/9 of the
    FLOPs of upsample + conv and is the same linear map. Deviation: we build the 4x4 kernel from the spatially
    flipped weight, so the result equals `conv3x3(upsample2x(x))` with THIS weight exactly up to float rounding
    (the official code does not flip; with N(0,1)-initialised learned weights that is only a relabelling; an
    imported official `Conv0_up` kernel, stored [k, k, out, in], is flipped on import: progan/official.py).
    The kernel is one GEMM (`_fused_kernel`). `fused=False` is the official `fused_scale=False` (networks.py
    L193-196): `upscale2d`, then a plain 3x3 conv with the same weight (`Conv0`), the same function at 9/4 the FLOPs.
    """

    def __init__(self, in_channels: int, out_channels: int, gain: float = SQRT2, equalized: bool = True,
                 fused: bool = True):
        super().__init__(in_channels, out_channels, 3, gain, equalized)
        self.fused = fused

    def forward(self, x: Tensor) -> Tensor:
        if not self.fused:
            return super().forward(upsample2x(x))                     # [N, out, 2H, 2W]
        w = self.weight.transpose(0, 1)                              # [in, out, 3, 3] (conv_transpose layout)
        w = _fused_kernel(w, self.scale, flip=True)                  # [in, out, 4, 4], flipped and scaled
        return F.conv_transpose2d(x, w, self.bias, stride=2, padding=1)


class ConvDown2d(EqualizedConv2d):
    """A 3x3 equalized conv followed by the 2x2 box downsample, fused into one stride-2 4x4 conv.

    Official `D_paper` default `fused_scale=True` (`conv2d_downscale2d`): padded 3x3 kernel, four shifted copies
    summed and scaled by 1/4. Equals `downsample2x(conv3x3(x))` up to float rounding, at 4/9 of the FLOPs.
    The bias is added after the downsample (it commutes with averaging), as in the official code. The kernel is
    one GEMM (`_fused_kernel`). `conv` is the same weight as a plain 3x3 conv with its bias (official
    `fused_scale=False`, `Conv1`: D's block then applies the LReLU BEFORE the pooling, networks._DBlock).
    """

    def __init__(self, in_channels: int, out_channels: int, gain: float = SQRT2, equalized: bool = True):
        super().__init__(in_channels, out_channels, 3, gain, equalized)

    def forward(self, x: Tensor) -> Tensor:
        w = _fused_kernel(self.weight, self.scale * 0.25)            # [out, in, 4, 4], scaled, / 4
        return F.conv2d(x, w, self.bias, stride=2, padding=1)

    def conv(self, x: Tensor) -> Tensor:
        """The 3x3 conv alone, bias added, no pooling: [N, in, H, W] -> [N, out, H, W]."""
        return super().forward(x)
