"""The official ProGAN networks, rebuilt for the tests from tkarras/progressive_growing_of_gans (the TF release,
networks.py and tfutil.py at fdc55b9): written here from the official formulas with TensorFlow's own ops, never
copied, sharing no code with progan.model or progan.official. Line numbers are networks.py's.

- `official_variables(kind, kwargs, seed)`: the variables of a `tfutil.Network` of G_paper / D_paper, by local
  name in the template graph's creation order ('lod' first), in the official layouts: conv kernels [k, k, in, out]
  (conv2d L44-48), G's `Conv0_up` [k, k, out, in] (upscale2d_conv2d L88), dense [in, out] (L34-39), biases [C],
  'lod' a float32 scalar. Weights are drawn as the official init draws them (get_weight L22-29: N(0, 1) with
  use_wscale, else N(0, std^2)); biases are random too (the official init is 0: a bias put on the wrong layer
  would go unnoticed).
- `g_paper(variables, kwargs, latents)` / `d_paper(variables, kwargs, images)`: the outputs (images, scores) in
  float32 numpy, computed as the 'linear' structure (G L205-215, D L287-298: every level built and blended with
  lerp_clip at lod_in = the 'lod' variable), the structure of the template graph whose variables are pickled.
- `official_pickle(G, D, Gs)`: the bytes of an official network pickle: a (G, D, Gs) tuple of `tfutil.Network`
  (a stand-in class of that module and name) whose state is `Network.__getstate__`'s dict, arrays pickled under
  numpy 1's names (`numpy.core.multiarray._reconstruct`), as the released files are (Python 3.6, numpy 1.x).

TensorFlow's CPU kernels take NHWC only, so conv, transposed conv and avg_pool run through `_nhwc`, a layout
change and nothing else; every other op is written on NCHW, as the official graph (data_format='NCHW').
"""
from __future__ import annotations

import os
import pickle
import sys
import types

import numpy as np

G_DEFAULTS = dict(num_channels=1, resolution=32, label_size=0, fmap_base=8192, fmap_decay=1.0, fmap_max=512,
                  latent_size=None, normalize_latents=True, use_wscale=True, use_pixelnorm=True,
                  pixelnorm_epsilon=1e-8, use_leakyrelu=True, dtype="float32", fused_scale=True)   # G_paper L144-163
D_DEFAULTS = dict(num_channels=1, resolution=32, label_size=0, fmap_base=8192, fmap_decay=1.0, fmap_max=512,
                  use_wscale=True, mbstd_group_size=4, dtype="float32", fused_scale=True)         # D_paper L234-248
SQRT2 = np.sqrt(2)


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    return tf


def _kw(kind: str, kwargs: dict) -> dict:
    return {**(G_DEFAULTS if kind == "G" else D_DEFAULTS), **kwargs}


def _nf(kw: dict, stage: int) -> int:
    return min(int(kw["fmap_base"] / (2.0 ** (stage * kw["fmap_decay"]))), kw["fmap_max"])          # L167


def _log2(kw: dict) -> int:
    return int(np.log2(kw["resolution"]))


# ---- the variables ----------------------------------------------------------------------------------------

def variable_shapes(kind: str, kwargs: dict) -> list[tuple[str, tuple, float]]:
    """(local name, shape, He gain) of every variable, in the template graph's order; gain None for biases/lod."""
    kw, R = _kw(kind, kwargs), _log2(_kw(kind, kwargs))
    nf = lambda s: _nf(kw, s)                                                                   # noqa: E731
    out = [("lod", (), None)]

    def layer(name, shape, gain, out_channels=None):
        """weight, then bias [out] (apply_bias after the op: its output's channels)."""
        out.extend([(f"{name}/weight", shape, gain), (f"{name}/bias", (out_channels or shape[-1],), None)])

    if kind == "G":
        latent = kw["latent_size"] if kw["latent_size"] is not None else nf(0)
        layer("4x4/Dense", (latent + kw["label_size"], nf(1) * 16), SQRT2 / 4, nf(1))   # L184-186: bias after reshape
        layer("4x4/Conv", (3, 3, nf(1), nf(1)), SQRT2)
        layer(f"ToRGB_lod{R - 2}", (1, 1, nf(1), kw["num_channels"]), 1.0)
        for res in range(3, R + 1):
            if kw["fused_scale"]:
                layer(f"{2**res}x{2**res}/Conv0_up", (3, 3, nf(res - 1), nf(res - 2)), SQRT2, nf(res - 1))  # [k,k,out,in]
            else:
                layer(f"{2**res}x{2**res}/Conv0", (3, 3, nf(res - 2), nf(res - 1)), SQRT2)
            layer(f"{2**res}x{2**res}/Conv1", (3, 3, nf(res - 1), nf(res - 1)), SQRT2)
            layer(f"ToRGB_lod{R - res}", (1, 1, nf(res - 1), kw["num_channels"]), 1.0)
        return out
    layer("FromRGB_lod0", (1, 1, kw["num_channels"], nf(R - 1)), SQRT2)
    for res in range(R, 2, -1):
        layer(f"{2**res}x{2**res}/Conv0", (3, 3, nf(res - 1), nf(res - 1)), SQRT2)
        layer(f"{2**res}x{2**res}/{'Conv1_down' if kw['fused_scale'] else 'Conv1'}",
              (3, 3, nf(res - 1), nf(res - 2)), SQRT2)
        layer(f"FromRGB_lod{R - res + 1}", (1, 1, kw["num_channels"], nf(res - 2)), SQRT2)
    extra = 1 if kw["mbstd_group_size"] > 1 else 0
    layer("4x4/Conv", (3, 3, nf(1) + extra, nf(1)), SQRT2)
    layer("4x4/Dense0", (nf(1) * 16, nf(0)), SQRT2)
    layer("4x4/Dense1", (nf(0), 1 + kw["label_size"]), 1.0)
    return out


def _fan_in(name: str, shape: tuple) -> int:
    if "Conv0_up" in name:
        return shape[0] * shape[1] * shape[3]               # upscale2d_conv2d passes fan_in = k*k*in (L88)
    return int(np.prod(shape[:-1]))                          # get_weight default (L23)


def official_variables(kind: str, kwargs: dict, seed: int, lod: float = 0.0, bias_std: float = 0.2) -> list:
    """[(local name, float32 array)] as `Network.__getstate__` lists them (tfutil.py), drawn from `seed`."""
    kw = _kw(kind, kwargs)
    rng = np.random.default_rng(seed)
    out = []
    for name, shape, gain in variable_shapes(kind, kwargs):
        if name == "lod":
            value = np.float32(lod)
            out.append((name, np.array(value, dtype=np.float32)))
            continue
        if gain is None:
            std = bias_std
        else:
            std = 1.0 if kw["use_wscale"] else gain / np.sqrt(_fan_in(name, shape))    # L25-29
        out.append((name, rng.standard_normal(shape, dtype=np.float32) * np.float32(std)))
    return out


# ---- the networks, op by op ---------------------------------------------------------------------------------

class _Ops:
    """networks.py's layers (L15-139) on NCHW tensors, each reading its variables from `v` by scope name."""

    def __init__(self, tf, v: dict, use_wscale: bool):
        self.tf, self.v, self.use_wscale = tf, v, use_wscale

    def nhwc(self, op, x):
        tf = self.tf
        return tf.transpose(op(tf.transpose(x, [0, 2, 3, 1])), [0, 3, 1, 2])

    def weight(self, scope, gain, fan_in=None):                                               # get_weight L22-29
        w = self.tf.constant(self.v[f"{scope}/weight"])
        if fan_in is None:
            fan_in = int(np.prod(w.shape[:-1]))
        if self.use_wscale:
            return w * self.tf.constant(np.float32(gain / np.sqrt(fan_in)))
        return w

    def bias(self, scope, x):                                                                 # apply_bias L53-59
        b = self.tf.constant(self.v[f"{scope}/bias"])
        return x + b if len(x.shape) == 2 else x + self.tf.reshape(b, [1, -1, 1, 1])

    def dense(self, scope, x, gain=SQRT2):                                                    # L34-39
        tf = self.tf
        if len(x.shape) > 2:
            x = tf.reshape(x, [-1, int(np.prod(x.shape[1:]))])           # NCHW order, as the official graph's
        return tf.matmul(x, self.weight(scope, gain))

    def conv2d(self, scope, x, gain=SQRT2):                                                   # L44-48
        w = self.weight(scope, gain)
        return self.nhwc(lambda t: self.tf.nn.conv2d(t, w, strides=[1, 1, 1, 1], padding="SAME"), x)

    def upscale2d_conv2d(self, scope, x, gain=SQRT2):                                         # L86-93
        tf = self.tf
        w_var = self.v[f"{scope}/weight"]                                     # [k, k, out, in]
        w = self.weight(scope, gain, fan_in=w_var.shape[0] * w_var.shape[1] * x.shape[1])
        w = tf.pad(w, [[1, 1], [1, 1], [0, 0], [0, 0]], mode="CONSTANT")
        w = tf.add_n([w[1:, 1:], w[:-1, 1:], w[1:, :-1], w[:-1, :-1]])
        n, h, wd = x.shape[0], x.shape[2], x.shape[3]
        os_nhwc = [n, h * 2, wd * 2, w_var.shape[2]]
        return self.nhwc(lambda t: tf.nn.conv2d_transpose(t, w, os_nhwc, strides=[1, 2, 2, 1], padding="SAME"), x)

    def conv2d_downscale2d(self, scope, x, gain=SQRT2):                                       # L109-115
        tf = self.tf
        w = self.weight(scope, gain)
        w = tf.pad(w, [[1, 1], [1, 1], [0, 0], [0, 0]], mode="CONSTANT")
        w = tf.add_n([w[1:, 1:], w[:-1, 1:], w[1:, :-1], w[:-1, :-1]]) * 0.25
        return self.nhwc(lambda t: tf.nn.conv2d(t, w, strides=[1, 2, 2, 1], padding="SAME"), x)

    def upscale2d(self, x, factor=2):                                                         # L72-80
        tf = self.tf
        if factor == 1:
            return x
        s = x.shape
        x = tf.reshape(x, [-1, s[1], s[2], 1, s[3], 1])
        x = tf.tile(x, [1, 1, 1, factor, 1, factor])
        return tf.reshape(x, [-1, s[1], s[2] * factor, s[3] * factor])

    def downscale2d(self, x, factor=2):                                                       # L98-103
        tf = self.tf
        if factor == 1:
            return x
        k = [1, factor, factor, 1]
        return self.nhwc(lambda t: tf.nn.avg_pool(t, ksize=k, strides=k, padding="VALID"), x)

    def leaky_relu(self, x, alpha=0.2):                                                       # L64-67
        return self.tf.maximum(x * alpha, x)

    def pixel_norm(self, x, epsilon=1e-8):                                                    # L120-122
        tf = self.tf
        return x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axis=1, keepdims=True) + epsilon)

    def minibatch_stddev_layer(self, x, group_size=4):                                        # L127-139
        tf = self.tf
        group_size = min(group_size, x.shape[0])
        s = x.shape
        y = tf.reshape(x, [group_size, -1, s[1], s[2], s[3]])
        y = tf.cast(y, tf.float32)
        y -= tf.reduce_mean(y, axis=0, keepdims=True)
        y = tf.reduce_mean(tf.square(y), axis=0)
        y = tf.sqrt(y + 1e-8)
        y = tf.reduce_mean(y, axis=[1, 2, 3], keepdims=True)
        y = tf.cast(y, x.dtype)
        y = tf.tile(y, [group_size, 1, s[2], s[3]])
        return tf.concat([x, y], axis=1)


def _lerp_clip(tf, a, b, t):
    return a + (b - a) * tf.clip_by_value(t, 0.0, 1.0)                                          # L16


def g_paper(variables, kwargs: dict, latents: np.ndarray) -> np.ndarray:
    """G_paper's images_out [N, C, R, R] for `latents` [N, latent_size] (float32), lod_in = the 'lod' variable."""
    tf = _tf()
    kw, v = _kw("G", kwargs), dict(variables)
    R, o = _log2(kw), _Ops(tf, v, kw["use_wscale"])
    nf = lambda s: _nf(kw, s)                                                                   # noqa: E731
    PN = (lambda x: o.pixel_norm(x, kw["pixelnorm_epsilon"])) if kw["use_pixelnorm"] else (lambda x: x)   # L168
    act = o.leaky_relu if kw["use_leakyrelu"] else tf.nn.relu                                             # L171
    lod_in = tf.constant(np.float32(v["lod"]))

    def block(x, res):                                                                        # L179-199
        s = f"{2**res}x{2**res}"
        if res == 2:
            if kw["normalize_latents"]:
                x = o.pixel_norm(x, kw["pixelnorm_epsilon"])
            x = o.dense(f"{s}/Dense", x, gain=SQRT2 / 4)
            x = tf.reshape(x, [-1, nf(res - 1), 4, 4])
            x = PN(act(o.bias(f"{s}/Dense", x)))
            return PN(act(o.bias(f"{s}/Conv", o.conv2d(f"{s}/Conv", x))))
        if kw["fused_scale"]:
            x = PN(act(o.bias(f"{s}/Conv0_up", o.upscale2d_conv2d(f"{s}/Conv0_up", x))))
        else:
            x = o.upscale2d(x)
            x = PN(act(o.bias(f"{s}/Conv0", o.conv2d(f"{s}/Conv0", x))))
        return PN(act(o.bias(f"{s}/Conv1", o.conv2d(f"{s}/Conv1", x))))

    def torgb(x, res):                                                                        # L200-203
        scope = f"ToRGB_lod{R - res}"
        return o.bias(scope, o.conv2d(scope, x, gain=1.0))

    x = block(tf.constant(latents.astype(np.float32)), 2)                                     # linear, L206-215
    images_out = torgb(x, 2)
    for res in range(3, R + 1):
        lod = R - res
        x = block(x, res)
        img = torgb(x, res)
        images_out = o.upscale2d(images_out)
        images_out = _lerp_clip(tf, img, images_out, lod_in - lod)
    return images_out.numpy()


def d_paper(variables, kwargs: dict, images: np.ndarray) -> np.ndarray:
    """D_paper's scores_out [N] for `images` [N, C, R, R] (float32), lod_in = the 'lod' variable."""
    tf = _tf()
    kw, v = _kw("D", kwargs), dict(variables)
    R, o = _log2(kw), _Ops(tf, v, kw["use_wscale"])
    act = o.leaky_relu                                                                        # L254
    lod_in = tf.constant(np.float32(v["lod"]))

    def fromrgb(x, res):                                                                      # L261-263
        scope = f"FromRGB_lod{R - res}"
        return act(o.bias(scope, o.conv2d(scope, x)))

    def block(x, res):                                                                        # L264-285
        s = f"{2**res}x{2**res}"
        if res >= 3:
            x = act(o.bias(f"{s}/Conv0", o.conv2d(f"{s}/Conv0", x)))
            if kw["fused_scale"]:
                return act(o.bias(f"{s}/Conv1_down", o.conv2d_downscale2d(f"{s}/Conv1_down", x)))
            x = act(o.bias(f"{s}/Conv1", o.conv2d(f"{s}/Conv1", x)))
            return o.downscale2d(x)
        if kw["mbstd_group_size"] > 1:
            x = o.minibatch_stddev_layer(x, kw["mbstd_group_size"])
        x = act(o.bias(f"{s}/Conv", o.conv2d(f"{s}/Conv", x)))
        x = act(o.bias(f"{s}/Dense0", o.dense(f"{s}/Dense0", x)))
        return o.bias(f"{s}/Dense1", o.dense(f"{s}/Dense1", x, gain=1.0))

    img = tf.constant(images.astype(np.float32))                                              # linear, L288-298
    x = fromrgb(img, R)
    for res in range(R, 2, -1):
        lod = R - res
        x = block(x, res)
        img = o.downscale2d(img)
        y = fromrgb(img, res - 1)
        x = _lerp_clip(tf, x, y, lod_in - lod)
    combo_out = block(x, 2)
    return combo_out[:, 0].numpy()                                                            # scores_out [:, :1]


# ---- the pickle --------------------------------------------------------------------------------------------

def network_state(name: str, func: str, kwargs: dict, variables, build_module_src: str = "") -> dict:
    """`tfutil.Network.__getstate__`'s dict (version 2)."""
    return {"version": 2, "name": name, "static_kwargs": dict(kwargs), "build_module_src": build_module_src,
            "build_func_name": func, "variables": list(variables)}


class _Numpy1Pickler(pickle._Pickler):
    """The pure-Python pickler, naming numpy's array and scalar constructors as numpy 1.x does
    (`numpy.core.multiarray`; numpy 2 writes `numpy._core.multiarray`): the released files were made with 1.x."""

    def save_global(self, obj, name=None):
        from numpy._core import multiarray

        old = {multiarray._reconstruct: "_reconstruct", multiarray.scalar: "scalar"}.get(obj)
        if old is None:
            return super().save_global(obj, name)
        self.save("numpy.core.multiarray")
        self.save(old)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def official_pickle(*states: dict, numpy1_names: bool = True) -> bytes:
    """The bytes of `pickle.dump((G, D, Gs), f, protocol=pickle.HIGHEST_PROTOCOL)` under Python 3.6 (protocol 4;
    misc.save_pkl) of `tfutil.Network` objects with these states: a stand-in class of that module and name."""
    import io

    module = types.ModuleType("tfutil")

    class Network:
        def __init__(self, state):
            self._state = state

        def __getstate__(self):
            return self._state

    Network.__module__, Network.__qualname__ = "tfutil", "Network"
    module.Network = Network
    saved = sys.modules.get("tfutil")
    sys.modules["tfutil"] = module
    try:
        buf = io.BytesIO()
        (_Numpy1Pickler if numpy1_names else pickle._Pickler)(buf, protocol=4).dump(tuple(Network(s) for s in states))
        return buf.getvalue()
    finally:
        if saved is None:
            del sys.modules["tfutil"]
        else:
            sys.modules["tfutil"] = saved


def official_networks(kwargs_G: dict, kwargs_D: dict | None = None, seed: int = 0, lod: float = 0.0,
                      build_module_src: str = "") -> tuple[dict, dict, dict]:
    """States of G, D and Gs with random weights (Gs: its own draw, as an EMA differs from G)."""
    kwargs_D = kwargs_G if kwargs_D is None else kwargs_D
    G = network_state("G", "G_paper", kwargs_G, official_variables("G", kwargs_G, seed, lod), build_module_src)
    D = network_state("D", "D_paper", kwargs_D, official_variables("D", kwargs_D, seed + 1, lod), build_module_src)
    Gs = network_state("Gs", "G_paper", kwargs_G, official_variables("G", kwargs_G, seed + 2, lod), build_module_src)
    return G, D, Gs
