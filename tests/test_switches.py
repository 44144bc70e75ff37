"""The official feature switches (config.py L109-116, "Disable individual features"; issue #15): each one against the
official construction (networks.py G_paper / D_paper / get_weight, train.py), the networks' shapes, one tiny training
run each, what checkpoints record, and the refusal to grow across a switch. The DAG for train.start_px is in
test_pipeline.py (both front ends).

    -nogrowing    train.start_px: crop.size        sched.lod_initial_resolution = the dataset resolution
    -nopixelnorm  model.pixel_norm: false          G.use_pixelnorm = False
    -nowscale     model.equalized_lr: false        G.use_wscale = False; D.use_wscale = False
    -noleakyrelu  model.leaky_relu: false          G.use_leakyrelu = False (D keeps leaky ReLU)
    (D_paper)     model.mbstd_group_size: 0        mbstd_group_size = 0: no minibatch stddev layer
    -nosmoothing  train.ema_decay: 0               train.G_smoothing = 0.0
    -noreset      train.reset_opt_each_phase: false  train.reset_opt_for_new_lod = False (test_train.py)
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from progan import checkpoint, params as params_mod, paths
from progan.errors import ProganError
from progan.model import Discriminator, Generator, ModelConfig
from progan.model.layers import EqualizedConv2d, EqualizedLinear, pixel_norm, upsample2x
from progan.train import loop, nets as nets_mod

from test_train import NO_MLFLOW, _stage, make_project, one_thread

TINY = dict(latent_dim=16, fmap_base=64, fmap_max=16, mbstd_group_size=4)


# ---- the networks against the official construction ------------------------------------------------------------

def _official_g(G: Generator, z: torch.Tensor, use_pixelnorm: bool, use_leakyrelu: bool) -> torch.Tensor:
    """G_paper (networks.py L144-229) at alpha 1, written out op by op with G's own weights: normalize_latents
    always, PN = pixel_norm if use_pixelnorm else identity (L168), act = leaky_relu(0.2) if use_leakyrelu else
    tf.nn.relu (L171), Conv0_up as upscale2d then a 3x3 conv (the fused op is the same linear map), ToRGB gain 1."""
    PN = pixel_norm if use_pixelnorm else (lambda x: x)
    act = (lambda x: torch.maximum(x * 0.2, x)) if use_leakyrelu else F.relu     # official leaky_relu L64-67

    def conv(layer, x):
        return F.conv2d(x, layer.weight * layer.scale, layer.bias, padding=layer.padding)

    b4 = G.blocks["4"]
    x = F.linear(pixel_norm(z), b4.dense.weight * b4.dense.scale).view(-1, b4.nf, 4, 4)
    x = PN(act(x + b4.dense_bias.view(1, -1, 1, 1)))
    x = PN(act(conv(b4.conv, x)))
    for res in range(3, G.res_px.bit_length()):
        block = G.blocks[str(2**res)]
        x = PN(act(conv(block.conv0, upsample2x(x))))
        x = PN(act(conv(block.conv1, x)))
    return conv(G.to_rgb[str(G.res_px)], x)


@pytest.mark.parametrize("pixel_norm_on,leaky_on", [(True, True), (False, True), (True, False), (False, False)])
def test_generator_is_the_official_g_paper_with_each_switch(pixel_norm_on, leaky_on):
    torch.manual_seed(0)
    # fp64: the fused kernel is one GEMM (#17), rounded its own way; in fp32 a value at ReLU's kink can land on the
    # other side of 0 than the op-by-op construction's
    G = Generator(ModelConfig(**TINY, pixel_norm=pixel_norm_on, leaky_relu=leaky_on), 16).double()
    z = torch.randn(5, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(G(z), _official_g(G, z, pixel_norm_on, leaky_on), rtol=1e-10, atol=1e-10)
        other = _official_g(G, z, not pixel_norm_on, leaky_on)
    assert not torch.allclose(G(z).detach(), other, atol=1e-3)          # the switch really changes the function


def test_leaky_relu_switch_leaves_d_alone_and_mbstd_0_removes_the_layer():
    """-noleakyrelu is G's only (D_paper's act is always leaky_relu, networks.py L254). mbstd_group_size 0: no stddev
    feature map (D_paper `if mbstd_group_size > 1`, L277), so a sample's score no longer depends on the others."""
    x = torch.randn(8, 3, 8, 8)
    scores = []
    for leaky in (True, False):
        torch.manual_seed(1)
        scores.append(Discriminator(ModelConfig(**TINY, leaky_relu=leaky), 8)(x))
    assert torch.equal(scores[0], scores[1])
    torch.manual_seed(1)
    D0 = Discriminator(ModelConfig(**{**TINY, "mbstd_group_size": 0}), 8)
    assert D0.blocks["4"].conv.weight.shape[1] == 16                  # nf(4) channels, no + 1
    torch.testing.assert_close(D0(x)[:4], D0(x[:4]))                  # per-sample: any batch size, no groups
    torch.manual_seed(1)
    D4 = Discriminator(ModelConfig(**TINY), 8)
    assert D4.blocks["4"].conv.weight.shape[1] == 17
    assert not torch.allclose(D4(x)[:4], D4(torch.cat([x[:4], x[:4] * 3])[:8])[:4])   # the group's stddev counts


def test_nowscale_is_plain_he_init_with_no_run_time_scale():
    """Official get_weight (networks.py L22-29): std = gain / sqrt(fan_in); use_wscale=True stores N(0, 1) times a
    constant wscale = std, use_wscale=False stores a variable drawn from N(0, std^2). Both draw the same randn here,
    so the networks compute the same function at init; only what Adam updates (and so the effective step) differs.
    The forward passes are compared in float64 (seeded inputs): in float32 the fused layers fold the scale into the
    4x4 kernel in a different order (`w @ (M * std)` against `(w * std) @ M`), a last-bit difference that the nets
    amplify past 1e-6 for some inputs (this test was flaky on the unseeded global RNG)."""
    gen = torch.Generator().manual_seed(3)
    for Net, res, inputs in ((Generator, 16, torch.randn(4, 16, generator=gen, dtype=torch.float64)),
                             (Discriminator, 16, torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64))):
        torch.manual_seed(2)
        eq = Net(ModelConfig(**TINY), res)
        torch.manual_seed(2)
        plain = Net(ModelConfig(**TINY, equalized_lr=False), res)
        layers = [(a, b) for a, b in zip(eq.modules(), plain.modules()) if isinstance(a, (EqualizedConv2d, EqualizedLinear))]
        assert len(layers) > 5
        for a, b in layers:
            assert b.scale == 1.0 and a.scale != 1.0
            torch.testing.assert_close(b.weight, a.weight * a.scale, rtol=0, atol=0)   # N(0, std^2), the same draw
            fan_in = a.weight[0].numel()
            assert a.scale == pytest.approx(_gain(a) / math.sqrt(fan_in))
        eq, plain = eq.double(), plain.double()
        with torch.no_grad():
            for a, b in zip(eq.modules(), plain.modules()):     # the fp32 relation above, rounded once in fp64
                if isinstance(a, (EqualizedConv2d, EqualizedLinear)):
                    b.weight.copy_(a.weight * a.scale)
            # fp64: the two orders of the same sums differ by ~1e-16 relative per op; 1e-10 leaves a wide margin
            torch.testing.assert_close(plain(inputs), eq(inputs), rtol=1e-10, atol=1e-10)
    big = EqualizedConv2d(256, 512, 3, equalized=False)               # He init: std sqrt(2 / (9 * 256))
    assert big.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.01)


def _gain(layer) -> float:
    """Our layers' gains: sqrt(2), except G's 4x4 dense (sqrt(2) / 4), toRGB and D's last dense (1)."""
    fan_in = layer.weight[0].numel()
    return layer.scale * math.sqrt(fan_in)


def test_model_config_validates_the_switches():
    with pytest.raises(ProganError, match="model.pixel_norm must be true or false"):
        ModelConfig(pixel_norm=1)
    with pytest.raises(ProganError, match=r"model.mbstd_group_size must be an integer >= 0"):
        ModelConfig(mbstd_group_size=-1)
    assert ModelConfig(mbstd_group_size=0).mbstd_group_size == 0


# ---- params ---------------------------------------------------------------------------------------------------

def test_params_validate_start_px(tmp_path):
    from helpers import tiny_params

    stages = {"16": _stage(8, 0, 0.1)}
    p = params_mod.load(tiny_params(tmp_path, size_px=16, train__start_px=16, train__stages=stages))
    assert p.resolutions == [16] and p.levels == [4, 8, 16] and p.start_px == 16
    # stages below start_px may stay (dvc exp run -S cannot delete keys); they are not trained
    full = {str(r): _stage(8, 0 if r == 4 else 0.1, 0.1) for r in (4, 8, 16)}
    with pytest.raises(params_mod.ParamsError, match=r"train.stages.16.transition_kimg must be 0: 16 px is the "
                                                     r"first stage \(train.start_px\), there is nothing to fade in"):
        params_mod.load(tiny_params(tmp_path, size_px=16, train__start_px=16, train__stages=full))
    full["8"]["transition_kimg"] = 0
    assert params_mod.load(tiny_params(tmp_path, size_px=16, train__start_px=8, train__stages=full)).resolutions == [8, 16]
    with pytest.raises(params_mod.ParamsError, match=r"train.start_px 32 is above crop.size 16"):
        params_mod.load(tiny_params(tmp_path, size_px=16, train__start_px=32, train__stages=stages))
    with pytest.raises(params_mod.ParamsError, match=r"train.start_px must be a power of two"):
        params_mod.load(tiny_params(tmp_path, size_px=16, train__start_px=12, train__stages=stages))
    with pytest.raises(params_mod.ParamsError, match=r"no entry for resolution 16; train.start_px 8 to crop.size 16 "
                                                     r"needs 8, 16"):
        params_mod.load(tiny_params(tmp_path, size_px=16, train__start_px=8, train__stages={"8": _stage(8, 0, 1)}))
    with pytest.raises(params_mod.ParamsError, match=r"model.leaky_relu must be boolean"):
        params_mod.load(tiny_params(tmp_path, model__leaky_relu="no"))


def test_every_params_file_names_the_official_switch_of_each_key():
    import yaml
    from helpers import REPO

    from progan import demo, presets

    files = {"params.yaml": (REPO / "params.yaml").read_text(), "params.demo.yaml": demo.template(),
             **{f"{name}.yaml": presets.full_text(name) for name in presets.names()}}
    official = {"start_px": "lod_initial_resolution", "pixel_norm": "use_pixelnorm", "equalized_lr": "use_wscale",
                "leaky_relu": "use_leakyrelu", "ema_decay": "smoothing", "reset_opt_each_phase": "reset"}
    for f, text in files.items():
        lines = {line.split(":")[0].strip(): line for line in text.splitlines() if ":" in line}
        for key, name in official.items():
            assert name.lower() in lines[key].lower(), (f, key)
        data = yaml.safe_load(text)
        params_mod.validate(data, f)
        p = params_mod.Params(data, REPO / f)
        assert (p.start_px, p.model.pixel_norm, p.model.equalized_lr, p.model.leaky_relu) == (4, True, True, True), f


# ---- one tiny run per switch; what the checkpoint records; the refusal ---------------------------------------

SWITCHES = {
    "nopixelnorm": {"model__pixel_norm": False},
    "nowscale": {"model__equalized_lr": False},
    "noleakyrelu": {"model__leaky_relu": False},
    "nombstd": {"model__mbstd_group_size": 0},
    "nosmoothing": {"train__ema_decay": 0.0},
    "noreset": {"train__reset_opt_each_phase": False},
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_one_tiny_run_per_switch(tmp_path, monkeypatch, name):
    """4 px then 8 px, 2 + 3 minibatches: finite losses, the checkpoint records the switch, and stage 8 grows."""
    stages = {"4": _stage(8, 0, 0.016), "8": _stage(8, 0.008, 0.016)}
    path = make_project(tmp_path, stages=stages, mlflow__tracking_uri=NO_MLFLOW, **SWITCHES[name])
    monkeypatch.chdir(tmp_path)
    p = params_mod.load(path)
    with one_thread():
        loop.run(p, res=4)
        info = loop.run(p, res=8)
    assert all(math.isfinite(v) for v in info["final"].values())
    ck = checkpoint.load_stage(paths.checkpoint(8), 8)
    (dotted, value), = SWITCHES[name].items()
    section, key = dotted.split("__")
    recorded = checkpoint.recorded_settings(paths.checkpoint(8), ck)
    assert recorded[f"{section}.{key}"] == value
    cfg = checkpoint.model_config(paths.checkpoint(8), ck["model"])
    G = Generator(cfg, 8)
    G.load_state_dict(ck["G_ema"])
    assert G(torch.randn(2, cfg.latent_dim)).shape == (2, 3, 8, 8)
    if name == "nosmoothing":                     # G_smoothing 0: Gs is G (lerp(G, Gs, 0) = G, tfutil.py)
        assert all(torch.equal(ck["G"][k], ck["G_ema"][k]) for k in ck["G"])
    else:
        assert any(not torch.equal(ck["G"][k], ck["G_ema"][k]) for k in ck["G"])
    if name == "nowscale":
        assert all(m.scale == 1.0 for m in G.modules() if isinstance(m, (EqualizedConv2d, EqualizedLinear)))


def test_nogrowing_trains_one_stage_from_scratch(tmp_path, monkeypatch):
    """train.start_px = crop.size: one stage at full resolution from scratch, alpha 1 throughout (official
    -nogrowing: lod_initial_resolution = resolution, lod_training_kimg = lod_transition_kimg = 0)."""
    path = make_project(tmp_path, stages={"8": _stage(8, 0, 0.024)}, mlflow__tracking_uri=NO_MLFLOW,
                        train__start_px=8)
    monkeypatch.chdir(tmp_path)
    p = params_mod.load(path)
    with one_thread(), pytest.raises(ProganError, match=r"--res 4: not a training resolution .* \(one of 8\)"):
        loop.run(p, res=4)
    with one_thread():
        info = loop.run(p, res=8)
    ck = checkpoint.load_stage(paths.checkpoint(8), 8)
    assert not Path(paths.checkpoint(4)).exists() and ck["prev_checkpoint_sha256"] is None
    assert ck["total_kimg"] == pytest.approx(0.024) and ck["alpha"] == 1.0 and info["grown_keys"] == len(ck["G"])
    assert ck["params"]["train.start_px"] == 8
    rows = Path(paths.losses_tsv(8)).read_text().splitlines()[1:]
    assert {r.split("\t")[2] for r in rows} == {"stabilize"} and {float(r.split("\t")[3]) for r in rows} == {1.0}


def test_growing_from_a_checkpoint_made_with_other_switches_fails_naming_the_key(tmp_path, monkeypatch):
    path = make_project(tmp_path, stages={"4": _stage(8, 0, 0.016), "8": _stage(8, 0.008, 0.008)},
                        mlflow__tracking_uri=NO_MLFLOW)
    monkeypatch.chdir(tmp_path)
    p0 = params_mod.load(path)                        # held in memory: the loop below rewrites params.yaml
    with one_thread():
        loop.run(p0, res=4)
    ck4 = checkpoint.load_stage(paths.checkpoint(4), 4)
    for dotted, value, shown in (("model.equalized_lr", False, "model.equalized_lr true, params.yaml has false"),
                                 ("model.mbstd_group_size", 0, "model.mbstd_group_size 4, params.yaml has 0"),
                                 ("train.reset_opt_each_phase", False,
                                  "train.reset_opt_each_phase true, params.yaml has false")):
        section, key = dotted.split(".")
        p = params_mod.load(make_project(tmp_path, stages={"4": _stage(8, 0, 0.016), "8": _stage(8, 0.008, 0.008)},
                                         mlflow__tracking_uri=NO_MLFLOW, **{f"{section}__{key}": value}))
        with pytest.raises(ProganError) as e:
            nets_mod.build_networks(p, 8)
        msg = str(e.value)
        assert msg.startswith(f"{paths.checkpoint(4)}: made with {shown}; a stage grows only from one trained with "
                              f"the same settings: re-run every stage from `progan train --res 4`, or restore {dotted}")
        assert "\n" not in msg
    # a checkpoint from before the switches existed holds the official defaults: it still grows
    old = {**ck4, "model": {k: v for k, v in ck4["model"].items() if k in ("latent_dim", "fmap_base", "fmap_max",
                                                                          "mbstd_group_size", "num_channels")},
           "params": {k: v for k, v in ck4["params"].items() if k != "train.start_px"}}
    cfg0 = ModelConfig.from_params(p0)
    checkpoint.check_grows_from(paths.checkpoint(4), old, cfg0, p0)
    with pytest.raises(ProganError, match=r"made with model.pixel_norm true, params.yaml has false"):
        checkpoint.check_grows_from(paths.checkpoint(4), old, dataclasses.replace(cfg0, pixel_norm=False), p0)
