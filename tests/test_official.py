"""The official networks (issue #27): `progan import` of an official-format pickle against the official construction
itself (tests/official_progan.py: G_paper / D_paper rebuilt with TensorFlow's ops, random weights in the official
layout, pickled as tfutil.Network pickles), hostile pickles, what cannot be represented, and the imported checkpoint
used by generate / interpolate / export / evaluate --checkpoint. Also issue #32 part 3: G and D against the official
construction at alpha 0, 0.3, 0.7 and 1 (the official `lod`), at 8 and 32 px, fused_scale on and off; and the
Table 1 preset's D order (the Theano code's)."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import official_progan as O
from helpers import celeba_faces, tiny_params
from test_train import one_thread
from progan import api, checkpoint, cli, official
from progan.errors import ProganError
from progan.model import Discriminator, Generator, ModelConfig
from progan.model.layers import downsample2x, upsample2x

TINY = dict(num_channels=3, label_size=0, fmap_base=64, fmap_max=16)     # latent_size None: nf(0) = 16


def _kw(res: int, fused: bool = True, **extra) -> dict:
    return {**TINY, "resolution": res, "fused_scale": fused, **extra}


def _write(folder, kw_G, kw_D=None, seed=0, lod=0.0, src="", name="net.pkl", states=None):
    states = states or O.official_networks(kw_G, kw_D, seed=seed, lod=lod, build_module_src=src)
    path = folder / name
    path.write_bytes(O.official_pickle(*states))
    return path, states


def _latents(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 16)).astype(np.float32)


def _nets(ckpt_path):
    """Our G, D and G_ema of a checkpoint, read as our tools read it (weights_only)."""
    ck = checkpoint.read(ckpt_path, (checkpoint.CHECKPOINT,), checkpoint.STAGE_KEYS)
    cfg = checkpoint.model_config(ckpt_path, ck["model"])
    nets = []
    for key, Net in (("G", Generator), ("D", Discriminator), ("G_ema", Generator)):
        net = Net(cfg, ck["res_px"])
        net.load_state_dict(ck[key])
        nets.append(net.eval().requires_grad_(False))
    return ck, *nets


def _close(got: np.ndarray, want: np.ndarray, what: str) -> float:
    """Max |got - want| <= 1e-4 of the official output's range (fp32); returns the error."""
    err = float(np.abs(got - want).max())
    tol = 1e-4 * max(float(want.max() - want.min()), 1.0)
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"
    return err


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return pytest.importorskip("tensorflow")


# ---- equivalence with the official construction -------------------------------------------------------------

@pytest.mark.parametrize("fused", [True, False], ids=["fused", "not-fused"])
def test_import_gives_the_official_images_and_scores_at_32px(tmp_path, capsys, tf, fused):
    """`progan import` of an official pickle: G_ema = Gs, G = G and D = D of the official construction within 1e-4
    of the range (fp32, random weights), read back with weights_only; build_module_src is never run."""
    marker = tmp_path / "build_module_src_ran"
    pkl, (G, D, Gs) = _write(tmp_path, _kw(32, fused), seed=1, src=f"open({str(marker)!r}, 'w').write('ran')\n")
    out = tmp_path / "imported.pt"
    assert cli.main(["import", str(pkl), "--out", str(out)]) == 0
    assert not marker.exists()
    ck, G_ours, D_ours, G_ema = _nets(out)
    assert ck["res_px"] == 32 and ck["alpha"] == 1.0 and ck["opt_G"] is None
    assert ck["model"] == dict(latent_dim=16, fmap_base=64, fmap_max=16, mbstd_group_size=4, num_channels=3,
                               pixel_norm=True, equalized_lr=True, leaky_relu=True, fused_scale=fused)
    assert ck["imported"]["file"] == "net.pkl" and len(ck["imported"]["sha256"]) == 64
    z = _latents(8)
    want = O.g_paper(Gs["variables"], Gs["static_kwargs"], z)
    loaded = api.load_generator(out)                                # what generate / interpolate / export read
    _close(loaded(torch.from_numpy(z)).numpy(), want, "G_ema vs Gs")
    with torch.no_grad():
        _close(G_ours(torch.from_numpy(z)).numpy(), O.g_paper(G["variables"], G["static_kwargs"], z), "G vs G")
        images = want + np.random.default_rng(2).normal(0, 0.3, want.shape).astype(np.float32)
        _close(D_ours(torch.from_numpy(images)).numpy(), O.d_paper(D["variables"], D["static_kwargs"], images),
               "D vs D")


def test_g_and_d_against_the_official_construction_at_every_alpha(tf):
    """Issue #32 part 3: the official lod = 1 - alpha (lerp_clip of networks.py G_paper / D_paper, linear structure)
    at alpha 0, 0.3, 0.7, 1, at 8 and 32 px, fused_scale on and off; our nets carry the official weights through
    progan.official's variable map (the lod does not change the weights)."""
    for res in (8, 32):
        for fused in (True, False):
            G, D, Gs = O.official_networks(_kw(res, fused), seed=res + fused)
            _, g_sd, d_sd, _ = official.convert("test.pkl", G, D, Gs)
            cfg = official.model_config("test.pkl", G, D, Gs).cfg
            G_ours, D_ours = Generator(cfg, res), Discriminator(cfg, res)
            G_ours.load_state_dict(g_sd)
            D_ours.load_state_dict(d_sd)
            z, images = _latents(8, res), np.random.default_rng(res).normal(size=(8, 3, res, res)).astype(np.float32)
            for alpha in (0.0, 0.3, 0.7, 1.0):
                lod = {"lod": np.array(1.0 - alpha, np.float32)}
                want_img = O.g_paper({**dict(G["variables"]), **lod}, G["static_kwargs"], z)
                want_scores = O.d_paper({**dict(D["variables"]), **lod}, D["static_kwargs"], images)
                with torch.no_grad():
                    _close(G_ours(torch.from_numpy(z), alpha).numpy(), want_img, f"G {res} px {fused} alpha {alpha}")
                    got = D_ours(torch.from_numpy(images), alpha).numpy()
                _close(got, want_scores, f"D {res} px fused={fused} alpha {alpha}")
                if alpha in (0.3, 0.7):                              # the weight counts: alpha^2 would be caught
                    with torch.no_grad():
                        squared = D_ours(torch.from_numpy(images), alpha * alpha).numpy()
                    assert np.abs(squared - want_scores).max() > 1e-3


def test_a_snapshot_mid_growth_imports_at_its_level(tmp_path, tf):
    """lod 1.7 at 32 px: our nets at 16 px, alpha 0.3; the official images are ours upscaled 2x (nearest), the
    official D scores what ours scores on the images box-downscaled 2x (linear structure, lerp_clip)."""
    pkl, (G, D, Gs) = _write(tmp_path, _kw(32, False), seed=5, lod=1.7)
    info = official.import_pickle(pkl)
    assert (info["res_px"], round(info["alpha"], 6)) == (16, 0.3)
    ck, _, D_ours, G_ema = _nets(info["out"])
    z = _latents(8)
    images = np.random.default_rng(3).normal(size=(8, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        _close(upsample2x(G_ema(torch.from_numpy(z), ck["alpha"])).numpy(),
               O.g_paper(Gs["variables"], Gs["static_kwargs"], z), "G_ema at lod 1.7")
        _close(D_ours(downsample2x(torch.from_numpy(images)), ck["alpha"]).numpy(),
               O.d_paper(D["variables"], D["static_kwargs"], images), "D at lod 1.7")


def test_the_table1_preset_d_applies_bias_and_lrelu_before_pooling_as_the_theano_code(tf):
    """paper-table1-celeba128 has model.fused_scale false: D's blocks are conv -> bias -> leaky ReLU -> 2x2 average
    pool, the Theano network.py@2609d1f D_paper order (Conv2DLayer + WScaleLayer, which adds the bias and applies
    the nonlinearity, then Downscale2DLayer), which the TF release imports as fused_scale=False (legacy.py
    patch_theano_gan). Checked op by op on the preset's model settings (feature maps made tiny) at 8 px, and against
    the official construction."""
    import dataclasses

    from progan import presets

    preset = ModelConfig.from_params(presets.load("paper-table1-celeba128"))
    assert preset.fused_scale is False and preset.mbstd_group_size == 16
    cfg = dataclasses.replace(preset, latent_dim=16, fmap_base=64, fmap_max=16)
    torch.manual_seed(0)
    D = Discriminator(cfg, 8).eval()
    with torch.no_grad():
        for m in D.modules():                                          # random biases: the order must show
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0, 0.5)
    x = torch.randn(16, 3, 8, 8)

    def conv(layer, h):
        return F.conv2d(h, layer.weight * layer.scale, layer.bias, padding=layer.weight.shape[-1] // 2)

    lrelu = lambda h: F.leaky_relu(h, 0.2)                                                      # noqa: E731
    b8, b4 = D.blocks["8"], D.blocks["4"]
    with torch.no_grad():
        h = lrelu(conv(D.from_rgb["8"], x))                           # D2x: NIN + WScaleLayer (bias, lrelu)
        h = lrelu(conv(b8.conv0, h))                                  # D2b
        h = F.avg_pool2d(lrelu(conv(b8.conv1, h)), 2)                 # D2a (bias, lrelu), then D2dn Downscale2DLayer
        theano = b4(h).squeeze(1)
        assert (D(x) - theano).abs().max() < 1e-5
        tf_order = b4(lrelu(F.avg_pool2d(conv(b8.conv1, lrelu(conv(b8.conv0, lrelu(conv(D.from_rgb["8"], x))))),
                                         2))).squeeze(1)
        assert (D(x) - tf_order).abs().max() > 1e-3                   # the TF default's order is another function
    # and against the official D_paper with fused_scale=False (the preset's fmaps, its group of 16)
    kw = dict(num_channels=3, resolution=8, fmap_base=64, fmap_max=16, mbstd_group_size=16, fused_scale=False)
    Dv = O.official_variables("D", kw, seed=7)
    G = O.network_state("G", "G_paper", kw, O.official_variables("G", kw, 8))
    _, _, d_sd, _ = official.convert("t.pkl", G, O.network_state("D", "D_paper", kw, Dv), G)
    D.load_state_dict(d_sd)
    with torch.no_grad():
        _close(D(x).numpy(), O.d_paper(Dv, kw, x.numpy()), "table1 D vs official D_paper fused_scale=False")


# ---- hostile and foreign files ---------------------------------------------------------------------------------

class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _stack_global(module: str, name: str) -> bytes:
    """A protocol 4 pickle that imports module.name and calls it with no arguments."""
    def s(text):
        b = text.encode()
        return b"\x8c" + bytes([len(b)]) + b
    return b"\x80\x04" + s(module) + s(name) + b"\x93" + b")" + b"R" + b"."


def _hostile(case: str, tmp_path) -> tuple[bytes, str]:
    """(file bytes, what the one-line refusal names)."""
    marker = tmp_path / "pwned"
    kw = _kw(8)
    if case == "os.system":
        return pickle.dumps(_System(marker), protocol=4), f"{os.system.__module__}.system"
    if case == "object.__subclasses__":                  # the walk from object to every class (os._wrap_close...)
        return _stack_global("builtins", "object.__subclasses__"), "builtins.object.__subclasses__"
    if case == "attribute path of an admitted class":
        return _stack_global("tfutil", "Network.__class__.__subclasses__"), "tfutil.Network.__class__.__subclasses__"
    if case == "ndarray subclass":
        G, D, Gs = O.official_networks(kw)
        G["variables"][1] = (G["variables"][1][0], np.matrix(G["variables"][1][1]))
        return O.official_pickle(G, D, Gs), "numpy.matrix"
    if case == "object array":
        G, D, Gs = O.official_networks(kw)
        G["variables"][1] = (G["variables"][1][0], np.array([_System(marker)], dtype=object))
        return O.official_pickle(G, D, Gs), "numpy dtype 'O8'"
    if case == "another Network class":
        data = O.official_pickle(*O.official_networks(kw))
        return data.replace(b"\x8c\x06tfutil", b"\x8c\x06evilmo"), "evilmo.Network"
    raise AssertionError(case)


HOSTILE = ["os.system", "object.__subclasses__", "attribute path of an admitted class", "ndarray subclass",
           "object array", "another Network class"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_pickles_are_refused_in_one_line_naming_the_class(tmp_path, capsys, case):
    data, named = _hostile(case, tmp_path)
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(data)
    assert cli.main(["import", str(pkl)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"progan import: error: {pkl}: refused: the pickle asks for {named},")
    assert "nothing in it was run" in err
    assert not (tmp_path / "pwned").exists() and not pkl.with_suffix(".pt").exists()


def test_theano_era_pickles_are_refused_with_what_to_do(tmp_path):
    module = b"network"
    data = b"\x80\x02c" + module + b"\nNetwork\nq\x00)\x81q\x01}q\x02b."           # protocol 2, as cPickle wrote
    pkl = tmp_path / "network-final.pkl"
    pkl.write_bytes(data)
    with pytest.raises(ProganError, match=r"asks for network.Network, .*a Theano-era network: load it once with the "
                                          r"official code's misc.load_pkl and save it with misc.save_pkl"):
        official.import_pickle(pkl)


def test_truncated_and_foreign_files_are_one_line(tmp_path, capsys):
    whole = O.official_pickle(*O.official_networks(_kw(8)))
    cases = {"truncated.pkl": (whole[: len(whole) // 2], "truncated"),
             "empty.pkl": (b"", "truncated"),
             "a-torch-file.pkl": (None, "not an official network pickle"),
             "a-list.pkl": (pickle.dumps([1, 2, 3]), "not an official network pickle: it holds a list")}
    torch.save({"a": torch.zeros(2)}, tmp_path / "a-torch-file.pkl")
    for name, (data, says) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        assert cli.main(["import", str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{tmp_path / name}: {says}" in err, err
    assert cli.main(["import", str(tmp_path / "missing.pkl")]) == 1
    assert "no such file" in capsys.readouterr().err


def _mutated(tmp_path, **changes):
    G, D, Gs = O.official_networks(_kw(8))
    for key, value in changes.items():
        who, what = key.split("__", 1)
        for net in {"G": [G], "D": [D], "Gs": [Gs], "GGs": [G, Gs], "all": [G, D, Gs]}[who]:
            value(net) if callable(value) else net["static_kwargs"].update({what: value})
    return _write(tmp_path, None, states=(G, D, Gs))[0]


def _drop(name):
    return lambda net: net.update(variables=[(n, v) for n, v in net["variables"] if n != name])


def _reshape(name):
    return lambda net: net.update(variables=[(n, v[..., :-1] if n == name else v) for n, v in net["variables"]])


def _set_lod(value):
    return lambda net: net.update(variables=[(n, np.array(value, np.float32) if n == "lod" else v)
                                             for n, v in net["variables"]])


@pytest.mark.parametrize("changes,message", [
    ({"all__label_size": 10}, r"G has label_size 10; progan needs 0 \(conditional \(labelled\) networks are not "),
    ({"all__num_channels": 1}, r"G has num_channels 1; progan needs 3 \(progan's data and metrics are RGB\)"),
    ({"all__fmap_decay": 0.5}, r"G has fmap_decay 0.5; progan needs 1.0"),
    ({"all__normalize_latents": False}, r"normalize_latents False; progan needs True"),
    ({"D__use_wscale": False}, r"G has use_wscale True and D False; .*\(model.equalized_lr\)"),
    ({"all__dtype": "float64"}, r"dtype 'float64'; float32 or float16 networks only"),
    ({"D__x": _set_lod(0.5)}, r"G, D and Gs hold different lods"),
    ({"GGs__x": _drop("8x8/Conv1/bias")}, r"G has no variable 8x8/Conv1/bias"),
    ({"D__x": _reshape("4x4/Dense0/weight")}, r"D variable 4x4/Dense0/weight has shape \[256, 15\], which does not fit"),
    ({"G__x": lambda net: net["variables"].append(("8x8/Extra/weight", np.zeros(2, np.float32)))},
     r"G has variable 8x8/Extra/weight, which G_paper / D_paper of these static_kwargs do not make"),
    ({"D__x": lambda net: net.update(build_func_name="D_basic")}, r"D was built by 'D_basic', not networks.D_paper"),
    ({"G__x": lambda net: net.update(version=1)}, r"G is not a version 2 tfutil.Network state"),
    ({"G__x": lambda net: net["variables"].__setitem__(3, (net["variables"][3][0], net["variables"][3][1] * np.nan))},
     r"G variable 4x4/Conv/weight is not finite numbers"),
])
def test_what_we_cannot_represent_is_refused_in_one_line(tmp_path, changes, message):
    pkl = _mutated(tmp_path, **changes)
    with pytest.raises(ProganError) as e:
        official.import_pickle(pkl)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{pkl}: ")
    import re
    assert re.search(message, str(e.value)), str(e.value)
    assert not pkl.with_suffix(".pt").exists()


def test_unknown_static_kwargs_are_ignored_as_g_paper_ignores_them(tmp_path):
    """G_paper / D_paper take **kwargs and ignore what they do not know (networks.py L163, L248): so do we, and
    say so in the import's log and result."""
    pkl = _mutated(tmp_path, D__use_gdrop=True, GGs__tanh_at_end=None)
    info = official.import_pickle(pkl)
    assert info["res_px"] == 8 and info["ignored"] == ["D.use_gdrop", "G.tanh_at_end"]


# ---- using an imported checkpoint --------------------------------------------------------------------------------

def test_generate_interpolate_export_and_evaluate_an_imported_checkpoint(tmp_path, capsys):
    pkl, _ = _write(tmp_path, _kw(16, False), seed=4)
    assert cli.main(["import", "--help"]) == 0 and "progan import" in capsys.readouterr().out
    out = tmp_path / "net.pt"
    assert cli.main(["import", str(pkl)]) == 0 and out.is_file()           # default: beside the pickle, .pt
    assert cli.main(["generate", "--checkpoint", str(out), "--n", "3", "--out", str(tmp_path / "s"),
                     "--device", "cpu"]) == 0
    assert sorted(f.name for f in (tmp_path / "s").iterdir()) == [f"seed0-0000{i}.png" for i in range(3)]
    assert cli.main(["interpolate", "--checkpoint", str(out), "--seeds", "1,2", "--steps", "2",
                     "--out", str(tmp_path / "walk.gif"), "--device", "cpu"]) == 0
    assert cli.main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "G.pt")]) == 0
    a, b = api.load_generator(out), api.load_generator(tmp_path / "G.pt")
    assert np.array_equal(a.sample(4, seed=3), b.sample(4, seed=3))

    project = tiny_params(tmp_path / "proj", size_px=16, evaluate__metrics=["swd", "msssim"])
    (tmp_path / "proj/data/pyramid").mkdir(parents=True)
    np.save(tmp_path / "proj/data/pyramid/16.npy", celeba_faces(80, 16))
    capsys.readouterr()
    assert cli.main(["evaluate", "--params", str(project), "--checkpoint", str(out)]) == 0
    result = json.loads(out.with_suffix(".eval.json").read_text())
    assert result["res_px"] == 16 and result["num_images"] == 64 and result["alpha"] == 1.0
    assert result["swd"]["swd_avg"] > 0 and 0 <= result["msssim_fake"] <= 1
    assert result["checkpoint_sha256"] == checkpoint_sha(out)
    assert not (tmp_path / "proj/results").exists()                          # not a stage: no results/16/
    assert cli.main(["evaluate", "--params", str(project), "--checkpoint", str(out), "--res", "8"]) == 1
    assert "--res 8: " in capsys.readouterr().err
    assert cli.main(["evaluate", "--params", str(project)]) == 1
    assert "--res R (a stage's checkpoint) or --checkpoint FILE is needed" in capsys.readouterr().err


def checkpoint_sha(path) -> str:
    from progan.fileio import sha256_file
    return sha256_file(path)
