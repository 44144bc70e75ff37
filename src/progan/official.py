"""`progan import PKL`: an official ProGAN network pickle (tkarras/progressive_growing_of_gans, e.g. the released
`karras2018iclr-celebahq-1024x1024.pkl` and the LSUN 256 px ones) as a progan checkpoint, without TensorFlow.

The file is `pickle.dump((G, D, Gs))` of three `tfutil.Network`s, whose `__getstate__` (tfutil.py) is
    {version: 2, name, static_kwargs, build_module_src, build_func_name, variables: [(local name, ndarray), ...]}.
It is read WITHOUT running it: `_Unpickler.find_class` admits `tfutil.Network` (as `_NetworkState`, which only keeps
the dict) and the numpy constructors that rebuild arrays of numbers, and refuses anything else in one line naming
it. `build_module_src` (the networks.py it was made with) is never executed: G_paper / D_paper are rebuilt by
progan.model, from `static_kwargs` (`model_config`), and the variables are mapped by name (`_G_MAP`, `_D_MAP`):
    dense [in, out] -> [out, in];  conv [k, k, in, out] -> [out, in, k, k];
    G's `Conv0_up` (upscale2d_conv2d, networks.py L88) [k, k, out, in] -> [out, in, k, k], spatially flipped: our
    fused kernel is built from the flipped 3x3 (layers.UpConv2d), so conv3x3(upsample(x)) with the flipped
    kernel is the official transposed conv;
    the equalized-lr scale is a run-time constant (get_weight L22-29), not a variable: both sides apply it.
G, D and Gs become G, D and G_ema of a "progan-checkpoint" (checkpoint.imported_checkpoint, no optimizer state),
which `progan generate / interpolate / export / evaluate --checkpoint`, `load_generator` and `train.init_from` read.

The official nets hold every level up to `resolution` and pick one with the 'lod' variable (the linear structure,
L205-215 / L287-298): lod = k + t (integer k, 0 <= t < 1) is our net at resolution / 2^k with alpha = 1 - t (G's
images come out 2^k times smaller than the official upscaled ones; D scores the images box-downscaled by 2^k).
A released network has lod 0: fully grown, alpha 1. G, D and Gs must hold the same lod.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

from progan import checkpoint
from progan.errors import ProganError
from progan.fileio import sha256_file
from progan.log import log
from progan.model.networks import MAX_RES_PX, Discriminator, Generator, ModelConfig

NOT_RUN = "nothing in it was run"


# ---- reading the pickle, and nothing else ---------------------------------------------------------------------

class _NetworkState:
    """What a pickled `tfutil.Network` holds: its __getstate__ dict, kept as it is (nothing is built or run)."""
    __slots__ = ("state",)

    def __setstate__(self, state):
        self.state = state


_NUMERIC_KINDS = "biufc"      # bool, int, uint, float, complex: numbers only (no objects, strings, records)


def _dtype(spec, align=False, copy=False):
    dt = np.dtype(spec, align, copy)
    if dt.kind not in _NUMERIC_KINDS or dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise _Refused(f"numpy dtype {spec!r}")
    return dt


def _reconstruct(subtype, shape, dtype_code):
    from numpy._core.multiarray import _reconstruct as rebuild

    if subtype is not np.ndarray:
        raise _Refused(f"an array of type {getattr(subtype, '__qualname__', subtype)!r}")
    return rebuild(np.ndarray, shape, dtype_code)


def _scalar(dtype, data):
    from numpy._core.multiarray import scalar

    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS or not isinstance(data, bytes):
        raise _Refused(f"a numpy scalar of dtype {dtype!r}")
    return scalar(dtype, data)


# (module, name) the official pickles name -> what we give them. numpy 1.x (the released files) writes
# numpy.core.multiarray, numpy 2 numpy._core.multiarray.
ADMITTED = {("tfutil", "Network"): _NetworkState,
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _dtype,
            **{(m, "_reconstruct"): _reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
            **{(m, "scalar"): _scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")}}


class _Refused(Exception):
    pass


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        found = ADMITTED.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found

    def persistent_load(self, pid):
        raise _Refused(f"a persistent id ({str(pid)[:40]!r})")


def read_networks(path: str | Path) -> tuple[dict, dict, dict]:
    """The (G, D, Gs) states of an official network pickle, each checked to be a tfutil.Network version 2 state
    with numeric arrays; every problem is one ProganError line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ProganError(f"{path}: no such file; pass the official .pkl (e.g. karras2018iclr-celebahq-1024x1024.pkl)")
    try:
        with open(path, "rb") as f:
            obj = _Unpickler(f).load()
    except _Refused as e:
        what = str(e)
        hint = (" (a Theano-era network: load it once with the official code's misc.load_pkl and save it with "
                "misc.save_pkl, which converts it, legacy.py)" if what == "network.Network" else "")
        raise ProganError(f"{path}: refused: the pickle asks for {what}, which an official network pickle does not "
                          f"hold (only tfutil.Network and numpy arrays of numbers){hint}; {NOT_RUN}") from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, UnicodeDecodeError, OverflowError, RecursionError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        kind = "truncated" if isinstance(e, EOFError) or "truncated" in reason else "not an official network pickle"
        raise ProganError(f"{path}: {kind} ({type(e).__name__}: {reason}); download it again, {NOT_RUN}") from None
    if not (isinstance(obj, tuple) and len(obj) == 3 and all(isinstance(n, _NetworkState) for n in obj)):
        got = type(obj).__name__ + (f" of {len(obj)}" if isinstance(obj, tuple) else "")
        raise ProganError(f"{path}: not an official network pickle: it holds a {got}, not (G, D, Gs) tfutil.Networks")
    return checked(path, *(n.state for n in obj))


def checked(path, G, D, Gs) -> tuple[dict, dict, dict]:
    """The three Network states checked (`_check_state`), their variables as {name: array}."""
    return tuple(_check_state(Path(path), who, s) for who, s in zip(("G", "D", "Gs"), (G, D, Gs)))


def _check_state(path: Path, who: str, state) -> dict:
    want = {"G": "G_paper", "D": "D_paper", "Gs": "G_paper"}[who]
    if not isinstance(state, dict) or state.get("version") != 2:
        got = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ProganError(f"{path}: {who} is not a version 2 tfutil.Network state (got {got!r}); re-save it with "
                          f"the official TF code (misc.save_pkl)")
    if state.get("build_func_name") != want:
        raise ProganError(f"{path}: {who} was built by {state.get('build_func_name')!r}, not networks.{want}; only "
                          f"the paper's networks can be imported")
    kwargs, variables = state.get("static_kwargs"), state.get("variables")
    if not isinstance(kwargs, dict) or not isinstance(variables, (list, dict)):
        raise ProganError(f"{path}: {who} lacks static_kwargs or variables; not an official network pickle")
    out = {}
    for item in (variables.items() if isinstance(variables, dict) else variables):     # dict: checked already
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ProganError(f"{path}: {who}'s variables must be (name, array) pairs; not an official network pickle")
        name, value = item
        value = np.asarray(value)
        if value.dtype.kind not in "biuf" or not np.all(np.isfinite(value)):
            raise ProganError(f"{path}: {who} variable {name} is not finite numbers ({value.dtype}); download it again")
        out[name] = value
    return {**state, "static_kwargs": {k: (v.item() if isinstance(v, np.generic) else v) for k, v in kwargs.items()},
            "variables": out}


# ---- static_kwargs -> our model settings ------------------------------------------------------------------------

# The official defaults (networks.py G_paper L144-163, D_paper L234-248): a pickle's static_kwargs hold only what
# config.py passed. Keys they do not know are ignored, as G_paper / D_paper ignore them (**kwargs).
G_DEFAULTS = dict(num_channels=1, resolution=32, label_size=0, fmap_base=8192, fmap_decay=1.0, fmap_max=512,
                  latent_size=None, normalize_latents=True, use_wscale=True, use_pixelnorm=True,
                  pixelnorm_epsilon=1e-8, use_leakyrelu=True, dtype="float32", fused_scale=True, structure=None)
D_DEFAULTS = dict(num_channels=1, resolution=32, label_size=0, fmap_base=8192, fmap_decay=1.0, fmap_max=512,
                  use_wscale=True, mbstd_group_size=4, dtype="float32", fused_scale=True, structure=None)
# What we cannot represent: the value we need, and why.
REQUIRED = {"num_channels": (3, "progan's data and metrics are RGB"),
            "label_size": (0, "conditional (labelled) networks are not supported"),
            "fmap_decay": (1.0, "model.fmap_base / 2^stage is the only feature-map rule (fmap_decay 1)"),
            "normalize_latents": (True, "G always pixel-normalises the latents"),
            "pixelnorm_epsilon": (1e-8, "the pixel norm's epsilon is fixed at 1e-8")}


@dataclasses.dataclass(frozen=True)
class Official:
    """What an official pickle's static_kwargs and lod make of our networks."""
    cfg: ModelConfig
    resolution: int          # the official nets' resolution (every level up to it is in the pickle)
    res_px: int              # ours: resolution / 2^floor(lod)
    alpha: float             # 1 - frac(lod)
    lod: float
    g_fused: bool            # G's layout: Conv0_up (fused) or Conv0
    ignored: tuple[str, ...]


def _settings(path: Path, who: str, kwargs: dict, defaults: dict) -> dict:
    kw = {**defaults, **kwargs}
    for key, (need, why) in REQUIRED.items():
        if key in kw and kw[key] != need:
            raise ProganError(f"{path}: {who} has {key} {kw[key]!r}; progan needs {need!r} ({why}); not imported")
    if kw["dtype"] not in ("float32", "float16"):
        raise ProganError(f"{path}: {who} has dtype {kw['dtype']!r}; float32 or float16 networks only; not imported")
    res = kw["resolution"]
    if not isinstance(res, int) or res < 4 or res > MAX_RES_PX or res & (res - 1):
        raise ProganError(f"{path}: {who} has resolution {res!r}; a power of two in [4, {MAX_RES_PX}] is needed")
    return kw


def model_config(path: str | Path, G: dict, D: dict, Gs: dict) -> Official:
    """Our ModelConfig, resolution and alpha for the official networks' static_kwargs and lod (one line on what
    cannot be represented)."""
    path = Path(path)
    G, D, Gs = checked(path, G, D, Gs)
    g = _settings(path, "G", G["static_kwargs"], G_DEFAULTS)
    d = _settings(path, "D", D["static_kwargs"], D_DEFAULTS)
    if {**g, "structure": None} != {**_settings(path, "Gs", Gs["static_kwargs"], G_DEFAULTS), "structure": None}:
        raise ProganError(f"{path}: G and Gs were built with different static_kwargs; not an official pickle")
    for key in ("resolution", "num_channels", "fmap_base", "fmap_max", "use_wscale"):
        if g[key] != d[key]:
            raise ProganError(f"{path}: G has {key} {g[key]!r} and D {d[key]!r}; progan's model settings hold one "
                              f"value for both (model.{'equalized_lr' if key == 'use_wscale' else key})")
    nf0 = min(int(g["fmap_base"]), int(g["fmap_max"]))
    latent = nf0 if g["latent_size"] is None else int(g["latent_size"])
    try:
        cfg = ModelConfig(latent_dim=latent, fmap_base=int(g["fmap_base"]), fmap_max=int(g["fmap_max"]),
                          mbstd_group_size=int(d["mbstd_group_size"]), num_channels=3,
                          pixel_norm=bool(g["use_pixelnorm"]), equalized_lr=bool(g["use_wscale"]),
                          leaky_relu=bool(g["use_leakyrelu"]), fused_scale=bool(d["fused_scale"]))
    except ProganError as e:
        raise ProganError(f"{path}: {e}; not imported") from None
    lods = {who: _lod(path, who, net) for who, net in (("G", G), ("D", D), ("Gs", Gs))}
    if len(set(lods.values())) > 1:
        raise ProganError(f"{path}: G, D and Gs hold different lods ({lods}); a snapshot holds one")
    lod = lods["G"]
    top = g["resolution"]
    if not 0.0 <= lod <= math.log2(top) - 2:
        raise ProganError(f"{path}: lod {lod:g} is outside [0, {int(math.log2(top)) - 2}] for a {top} px network")
    k = int(math.floor(lod))
    known = set(G_DEFAULTS) | set(D_DEFAULTS)
    ignored = tuple(sorted({f"{who}.{key}" for who, net in (("G", G), ("D", D))
                            for key in net["static_kwargs"] if key not in known}))
    return Official(cfg, top, top >> k, 1.0 - (lod - k), lod, bool(g["fused_scale"]), ignored)


def _lod(path: Path, who: str, net: dict) -> float:
    value = net["variables"].get("lod")
    if value is None or np.shape(value) != ():
        raise ProganError(f"{path}: {who} has no scalar 'lod' variable; not an official G_paper / D_paper network")
    return float(value)


# ---- the variables -> our state dicts ---------------------------------------------------------------------------

def _dense(a):
    return a.T                                               # [in, out] -> [out, in]


def _conv(a):
    return a.transpose(3, 2, 0, 1)                           # HWIO [k, k, in, out] -> OIHW


def _conv_up(a):
    return a.transpose(2, 3, 0, 1)[:, :, ::-1, ::-1]         # [k, k, out, in] -> [out, in, k, k], flipped


def _bias(a):
    return a


def _g_map(R: int, res_px: int, fused: bool) -> dict[str, tuple[str, object]]:
    """Our G key -> (official variable, transform) for our net at res_px from the official one at 2^R."""
    m = {"blocks.4.dense.weight": ("4x4/Dense/weight", _dense), "blocks.4.dense_bias": ("4x4/Dense/bias", _bias)}
    for r in range(2, res_px.bit_length()):
        px = 2**r
        if r == 2:
            convs = [("blocks.4.conv", "4x4/Conv", _conv)]
        else:
            up = (f"{px}x{px}/Conv0_up", _conv_up) if fused else (f"{px}x{px}/Conv0", _conv)
            convs = [(f"blocks.{px}.conv0", *up), (f"blocks.{px}.conv1", f"{px}x{px}/Conv1", _conv)]
        convs.append((f"to_rgb.{px}", f"ToRGB_lod{R - r}", _conv))
        for ours, theirs, fn in convs:
            m[f"{ours}.weight"] = (f"{theirs}/weight", fn)
            m[f"{ours}.bias"] = (f"{theirs}/bias", _bias)
    return m


def _d_map(R: int, res_px: int, fused: bool) -> dict[str, tuple[str, object]]:
    """Our D key -> (official variable, transform)."""
    m = {}
    for r in range(2, res_px.bit_length()):
        px = 2**r
        layers = [(f"from_rgb.{px}", f"FromRGB_lod{R - r}", _conv)]
        if r == 2:
            layers += [("blocks.4.conv", "4x4/Conv", _conv), ("blocks.4.dense0", "4x4/Dense0", _dense),
                       ("blocks.4.dense1", "4x4/Dense1", _dense)]
        else:
            layers += [(f"blocks.{px}.conv0", f"{px}x{px}/Conv0", _conv),
                       (f"blocks.{px}.conv1", f"{px}x{px}/{'Conv1_down' if fused else 'Conv1'}", _conv)]
        for ours, theirs, fn in layers:
            m[f"{ours}.weight"] = (f"{theirs}/weight", fn)
            m[f"{ours}.bias"] = (f"{theirs}/bias", _bias)
    return m


def _state_dict(path: Path, who: str, net: torch.nn.Module, variables: dict, mapping: dict, R: int) -> dict:
    """Our state dict of `net` from the official variables; one line naming a missing / unknown / misshapen one."""
    own = net.state_dict()
    if set(own) != set(mapping):                                         # the maps cover our nets exactly
        raise AssertionError(f"variable map of {who} out of step with progan.model: {sorted(set(own) ^ set(mapping))}")
    out = {}
    for key, (name, fn) in mapping.items():
        if name not in variables:
            raise ProganError(f"{path}: {who} has no variable {name}; not an official {2**R} px network of these "
                              f"static_kwargs")
        value = np.ascontiguousarray(fn(variables[name]), dtype=np.float32)
        if tuple(value.shape) != tuple(own[key].shape):
            raise ProganError(f"{path}: {who} variable {name} has shape {list(variables[name].shape)}, which does not "
                              f"fit these static_kwargs ({key} needs {list(own[key].shape)})")
        out[key] = torch.from_numpy(value.copy())
    return out


def _unknown_variables(path: Path, who: str, variables: dict, names: set[str]) -> None:
    unknown = sorted(set(variables) - names - {"lod"})
    if unknown:
        raise ProganError(f"{path}: {who} has variable {unknown[0]}, which G_paper / D_paper of these static_kwargs "
                          f"do not make ({len(unknown)} such); not imported")


def convert(path: str | Path, G: dict, D: dict, Gs: dict) -> tuple[Official, dict, dict, dict]:
    """(settings, G, D, G_ema state dicts) of the official networks."""
    path = Path(path)
    G, D, Gs = checked(path, G, D, Gs)
    off = model_config(path, G, D, Gs)
    R = off.resolution.bit_length() - 1
    g_all, d_all = _g_map(R, off.resolution, off.g_fused), _d_map(R, off.resolution, off.cfg.fused_scale)
    for who, net, full in (("G", G, g_all), ("D", D, d_all), ("Gs", Gs, g_all)):
        _unknown_variables(path, who, net["variables"], {name for name, _ in full.values()})
    g_map, d_map = _g_map(R, off.res_px, off.g_fused), _d_map(R, off.res_px, off.cfg.fused_scale)
    with torch.device("meta"):
        G_net, D_net = Generator(off.cfg, off.res_px), Discriminator(off.cfg, off.res_px)
    return (off, _state_dict(path, "G", G_net, G["variables"], g_map, R),
            _state_dict(path, "D", D_net, D["variables"], d_map, R),
            _state_dict(path, "Gs", G_net, Gs["variables"], g_map, R))


# ---- the command ---------------------------------------------------------------------------------------------

def import_pickle(pkl: str | Path, out: str | Path | None = None) -> dict:
    """Write the checkpoint of an official pickle; returns {"out", "res_px", "alpha", "sha256", ...}."""
    pkl = Path(pkl)
    out = Path(out) if out is not None else pkl.with_suffix(".pt")
    if out.resolve() == pkl.resolve():
        raise ProganError(f"--out {out}: would overwrite the pickle itself; name another file")
    states = read_networks(pkl)
    off, g_sd, d_sd, gs_sd = convert(pkl, *states)
    digest = sha256_file(pkl)
    source = {"file": pkl.name, "sha256": digest, "lod": off.lod, "resolution": off.resolution,
              "static_kwargs": {who: s["static_kwargs"] for who, s in zip(("G", "D", "Gs"), states)}}
    obj = checkpoint.imported_checkpoint(res_px=off.res_px, cfg=off.cfg, G=g_sd, D=d_sd, G_ema=gs_sd,
                                         alpha=off.alpha, source=source)
    checkpoint.save(out, obj)
    checkpoint.load_generator(out, "cpu")            # never leave a file our tools cannot read back
    for key in off.ignored:
        log.warning("import: %s: static_kwargs %s is not a G_paper / D_paper argument; ignored, as they ignore it",
                    pkl, key)
    n_g, n_d = (sum(v.numel() for v in sd.values()) for sd in (g_sd, d_sd))
    log.info("import: %s (%d px, lod %g) -> %s: %d px, alpha %g, model %s; G_ema %.2fM, D %.2fM parameters",
             pkl, off.resolution, off.lod, out, off.res_px, off.alpha,
             " ".join(f"{k}={v}" for k, v in dataclasses.asdict(off.cfg).items()), n_g / 1e6, n_d / 1e6)
    return {"out": str(out), "res_px": off.res_px, "alpha": off.alpha, "lod": off.lod, "sha256": digest,
            "model": dataclasses.asdict(off.cfg), "ignored": list(off.ignored)}


def import_main(argv: list[str] | None = None) -> int:
    from progan.generate import _run

    prog = "progan import"
    p = argparse.ArgumentParser(
        prog=prog, description="Convert an official ProGAN network pickle (tkarras/progressive_growing_of_gans, "
        "e.g. karras2018iclr-celebahq-1024x1024.pkl: G, D, Gs) into a progan checkpoint (G, D, G_ema), without "
        "TensorFlow and without running anything in the pickle. The result works with progan generate, "
        "interpolate, export, evaluate --checkpoint, load_generator and train.init_from.")
    p.add_argument("pkl", metavar="PKL", help="the official .pkl file")
    p.add_argument("--out", metavar="FILE.pt", help="the checkpoint to write (default: PKL with .pt)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return _run(prog, p, argv, lambda a: import_pickle(a.pkl, a.out))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(import_main())
