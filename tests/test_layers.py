"""Layer math against hand-computed values: equalized lr (§4.1), pixel norm (§4.2), minibatch stddev (§3)."""
import math

import pytest
import torch
import torch.nn.functional as F

from progan.errors import ProganError
from progan.model import layers
from progan.model.layers import (ConvDown2d, EqualizedConv2d, EqualizedLinear, UpConv2d, downsample2x,
                                 minibatch_stddev, pixel_norm, upsample2x)


def test_equalized_conv_scale_is_gain_over_sqrt_fan_in():
    torch.manual_seed(0)
    conv = EqualizedConv2d(16, 8, 3)                  # fan_in = 3 * 3 * 16 = 144 -> sqrt(2) / 12
    assert conv.scale == pytest.approx(math.sqrt(2) / 12, rel=1e-15)
    assert torch.count_nonzero(conv.bias) == 0
    with torch.no_grad():
        conv.bias.copy_(torch.arange(8.0))
    x = torch.randn(2, 16, 5, 5)
    ref = F.conv2d(x, conv.weight * (math.sqrt(2) / 12), conv.bias, padding=1)
    assert torch.equal(conv(x), ref)
    assert EqualizedConv2d(8, 3, 1, gain=1.0).scale == pytest.approx(1 / math.sqrt(8))   # toRGB


def test_equalized_weights_are_standard_normal_at_init():
    torch.manual_seed(0)
    w = EqualizedConv2d(64, 64, 3).weight             # 36864 samples: mean 0 +- 0.005, std 1 +- 0.004
    assert abs(w.mean().item()) < 0.03 and abs(w.std().item() - 1) < 0.03


def test_equalized_linear_scale_and_optional_bias():
    lin = EqualizedLinear(64, 4, gain=1.0)
    assert lin.scale == 1 / 8
    x = torch.randn(3, 64)
    assert torch.equal(lin(x), F.linear(x, lin.weight / 8, lin.bias))
    g_dense = EqualizedLinear(512, 8192, gain=math.sqrt(2) / 4, bias=False)   # G's 4x4 dense
    assert g_dense.bias is None and g_dense.scale == pytest.approx(math.sqrt(2) / 4 / math.sqrt(512))


def test_pixel_norm_on_a_known_vector():
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64)          # mean square 12.5
    expected = torch.tensor([[3.0, 4.0]], dtype=torch.float64) / math.sqrt(12.5 + 1e-8)
    assert torch.allclose(pixel_norm(x), expected, rtol=0, atol=1e-15)
    fmap = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1).repeat(2, 1, 2, 2)  # channel axis 1
    out = pixel_norm(fmap)
    expected = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64) / math.sqrt(25 / 3 + 1e-8)
    assert torch.allclose(out[:, :, 1, 0], expected)
    assert torch.equal(pixel_norm(torch.zeros(1, 4)), torch.zeros(1, 4))     # eps keeps zeros finite


def test_minibatch_stddev_hand_made_batch_group_of_4():
    # N = 8, G = 4 -> M = 2 groups, strided as in the official reshape: {0, 2, 4, 6} and {1, 3, 5, 7}.
    x = torch.zeros(8, 2, 2, 2, dtype=torch.float64)
    x[[0, 2, 4, 6], 0] = torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64).view(4, 1, 1)  # var 5
    x[[1, 3, 5, 7], 0] = 2.0                                                                  # var 0
    x[:, 1] = 9.0                                                                             # var 0
    out = minibatch_stddev(x, 4)
    assert out.shape == (8, 3, 2, 2)
    assert torch.equal(out[:, :2], x)
    tiny = math.sqrt(1e-8)                                   # sqrt(0 + eps)
    group0 = (math.sqrt(5 + 1e-8) + tiny) / 2                # mean over C=2 (H, W constant)
    group1 = (tiny + tiny) / 2
    expected = torch.tensor([group0, group1] * 4, dtype=torch.float64)
    assert torch.allclose(out[:, 2, 0, 0], expected, rtol=1e-12, atol=0)
    assert torch.equal(out[:, 2], out[:, 2, :1, :1].expand(8, 2, 2))   # replicated over pixels


def test_minibatch_stddev_small_batch_and_bad_batch():
    x = torch.tensor([0.0, 2.0]).view(2, 1, 1, 1)           # N < group: G = N = 2, std 1
    assert torch.allclose(minibatch_stddev(x, 4)[:, 1].flatten(), torch.full((2,), math.sqrt(1 + 1e-8)))
    with pytest.raises(ProganError, match="not divisible"):
        minibatch_stddev(torch.zeros(6, 1, 4, 4), 4)


def test_minibatch_stddev_of_parts_is_the_layer_on_each_part_alone():
    """parts = 3 (the training step's reals, fakes and mixed images in one pass): each part's output is bit for bit
    the layer applied to that part alone, also when a part is smaller than the group (a rank's slice); groups never
    take samples from two parts."""
    torch.manual_seed(3)
    for n, group in ((8, 4), (2, 4), (12, 4), (4, 1)):
        parts = [torch.randn(n, 5, 4, 4, dtype=torch.float64) for _ in range(3)]
        joint = minibatch_stddev(torch.cat(parts), group, parts=3)
        assert torch.equal(joint, torch.cat([minibatch_stddev(p, group) for p in parts])), (n, group)
    # the same values in two parts with a different third part: the first two parts' statistics do not move
    a, b = torch.randn(4, 2, 1, 1), torch.randn(4, 2, 1, 1)
    assert torch.equal(minibatch_stddev(torch.cat([a, a, b]), 4, 3)[:8], minibatch_stddev(torch.cat([a, a, a]), 4, 3)[:8])
    assert not torch.equal(minibatch_stddev(torch.cat([a, b]), 4)[:4], minibatch_stddev(a, 4))   # one part: mixed
    with pytest.raises(ProganError, match="does not split into 3 equal parts"):
        minibatch_stddev(torch.zeros(8, 1, 4, 4), 4, parts=3)


def test_up_and_down_sampling_values():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    up = upsample2x(x)
    assert torch.equal(up[0, 0], torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]))
    assert torch.equal(downsample2x(up), x)
    assert downsample2x(x).item() == 2.5


def test_fused_convs_equal_unfused_official_semantics():
    torch.manual_seed(1)
    up, down = UpConv2d(5, 7).double(), ConvDown2d(5, 7).double()
    with torch.no_grad():
        up.bias.normal_()
        down.bias.normal_()
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    ref_up = F.conv2d(upsample2x(x), up.weight * up.scale, up.bias, padding=1)
    assert torch.allclose(up(x), ref_up, rtol=0, atol=1e-12)
    ref_down = downsample2x(F.conv2d(x, down.weight * down.scale, None, padding=1)) + down.bias.view(1, -1, 1, 1)
    assert torch.allclose(down(x), ref_down, rtol=0, atol=1e-12)
    assert up.scale == down.scale == pytest.approx(math.sqrt(2) / math.sqrt(45))


def _official_fused_kernel(w3: torch.Tensor, down: bool) -> torch.Tensor:
    """The 4x4 kernel as the official code builds it (networks.py `upscale2d_conv2d` / `conv2d_downscale2d`), in
    its HWIO layout: w = tf.pad(w, [[1, 1], [1, 1], [0, 0], [0, 0]]); w = tf.add_n([w[1:, 1:], w[:-1, 1:],
    w[1:, :-1], w[:-1, :-1]]) (* 0.25 for the downscale)."""
    w = w3.permute(2, 3, 1, 0)                                          # [O, I, 3, 3] -> HWIO [3, 3, I, O]
    w = F.pad(w, (0, 0, 0, 0, 1, 1, 1, 1))                              # pad H and W by 1
    w = w[1:, 1:] + w[:-1, 1:] + w[1:, :-1] + w[:-1, :-1]
    return (w * 0.25 if down else w).permute(3, 2, 0, 1)                # back to [O, I, 4, 4]


def test_fused_kernels_are_the_official_padded_sums():
    """The one-GEMM kernels (`layers._fused_kernel`) equal the official tf.pad + tf.add_n construction, and so do
    the layers' outputs and their gradients w.r.t. the input and the weight (float64, 1e-12)."""
    torch.manual_seed(4)
    for cls in (ConvDown2d, UpConv2d):
        layer = cls(5, 7).double()                                      # weight [out 7, in 5, 3, 3]
        with torch.no_grad():
            layer.bias.normal_()
        scaled = layer.weight * layer.scale
        x = torch.randn(3, 5, 8, 8, dtype=torch.float64, requires_grad=True)
        if cls is ConvDown2d:
            official = _official_fused_kernel(scaled, down=True)       # [out, in, 4, 4]
            ours = layers._fused_kernel(layer.weight, layer.scale * 0.25)
            ref_out = F.conv2d(x, official, layer.bias, stride=2, padding=1)
        else:     # built from the spatially flipped weight (UpConv2d docstring), in conv_transpose's [in, out] layout
            official = _official_fused_kernel(scaled.flip(2, 3), down=False).transpose(0, 1)
            ours = layers._fused_kernel(layer.weight.transpose(0, 1), layer.scale, flip=True)
            ref_out = F.conv_transpose2d(x, official, layer.bias, stride=2, padding=1)
        torch.testing.assert_close(ours, official, rtol=0, atol=1e-12)
        out = layer(x)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
        probe = torch.randn_like(out)
        got = torch.autograd.grad((out * probe).sum(), [x, layer.weight])
        want = torch.autograd.grad((ref_out * probe).sum(), [x, layer.weight])
        for g, h in zip(got, want):
            torch.testing.assert_close(g, h, rtol=0, atol=1e-12)


def test_fused_kernel_matrix_made_under_inference_mode_still_trains():
    """The [9, 16] matrix is cached per (scale, flip, dtype, device): made first under inference_mode (sampling
    before training in one process), it must still be usable by autograd afterwards."""
    layers._pad_and_sum_matrix.cache_clear()
    layer = ConvDown2d(3, 4)
    with torch.inference_mode():
        layer(torch.randn(2, 3, 8, 8))
    layer(torch.randn(2, 3, 8, 8)).sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_layers_under_channels_last_and_bf16_autocast():
    torch.manual_seed(2)
    conv, up = EqualizedConv2d(4, 4, 3), UpConv2d(4, 4)
    x = torch.randn(2, 4, 8, 8)
    xc = x.contiguous(memory_format=torch.channels_last)
    assert torch.allclose(conv(xc), conv(x), atol=1e-5) and torch.allclose(up(xc), up(x), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = minibatch_stddev(pixel_norm(up(x)), 2)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 16, 16) and torch.isfinite(y.float()).all()


def test_minibatch_stddev_over_the_whole_minibatch_is_the_theano_all_layer():
    """model.mbstd_group_size = the batch (the Table 1 preset: 16) is the Theano code's minibatch stat layer with
    mbstat_func Tstdeps, mbstat_avg 'all' (config.py@2609d1f L81-82; network.py MinibatchStatConcatLayer): Tstdeps
    over axis 0 = sqrt(mean((x - mean(x, 0))^2, 0) + 1e-8), then Tmean of everything, tiled to [N, 1, H, W]."""
    torch.manual_seed(3)
    x = torch.randn(16, 8, 4, 4, dtype=torch.float64) * 2 + 1
    vals = torch.sqrt(((x - x.mean(dim=0, keepdim=True)) ** 2).mean(dim=0, keepdim=True) + 1e-8)   # Tstdeps
    vals = vals.mean().reshape(1, 1, 1, 1).expand(16, 1, 4, 4)                                   # 'all', tile
    theano = torch.cat([x, vals], dim=1)
    assert torch.allclose(minibatch_stddev(x, 16), theano, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(minibatch_stddev(x, 4), theano)              # groups of 4 are another statistic
