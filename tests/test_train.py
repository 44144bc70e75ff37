"""The training stage (train/loop.py, data.py, state.py) on tiny nets and a small real CelebA pyramid.

`make_project` is shared with test_resume.py / test_dist.py: a project folder with params.yaml (tiny nets:
latent 16, fmap_base 64, fmap_max 16) and data/pyramid/{4,8}.npy from 64 CelebA images downscaled with PIL.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from progan import checkpoint, params as params_mod, paths
from progan.fileio import sha256_file
from progan.errors import ProganError
from progan.train import data, loop, nets as nets_mod, state, step

from helpers import CELEBA_DIR, tiny_params

# MLflow is pointed at a path that cannot be created: tracking fails in milliseconds and training goes on.
NO_MLFLOW = "sqlite:////proc/progan-no-mlflow/mlflow.db"


def _stage(batch, transition_kimg, stabilize_kimg, lr=0.001):
    return {"batch": batch, "lr": lr, "transition_kimg": transition_kimg, "stabilize_kimg": stabilize_kimg}


def make_project(root: Path, n_images: int = 64, stages: dict | None = None, **overrides) -> Path:
    """params.yaml (crop.size 8, tiny nets) + the real 4 and 8 px pyramid levels; returns the params path."""
    stages = stages or {"4": _stage(8, 0, 0.1), "8": _stage(8, 0.05, 0.05)}
    overrides = {"train__tick_kimg": 0.05, "train__snapshot_kimg": 0.1,
                 "mlflow__tracking_uri": f"sqlite:///{root}/mlflow.db", **overrides}
    path = tiny_params(root, size_px=8, train__stages=stages, **overrides)
    top = []
    for f in sorted(CELEBA_DIR.glob("*.jpg"))[:n_images]:
        im = Image.open(f).convert("RGB")
        w, h = im.size
        t = (h - w) // 2
        top.append(np.asarray(im.crop((0, t, w, t + w)).resize((8, 8), Image.BOX)))
    top = np.stack(top)                                                        # [N, 8, 8, 3] uint8
    levels = {8: top, 4: np.rint(top.reshape(-1, 4, 2, 4, 2, 3).mean(axis=(2, 4))).astype(np.uint8)}
    for res, arr in levels.items():
        out = root / paths.pyramid_level(res)
        out.parent.mkdir(parents=True, exist_ok=True)
        mm = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=arr.shape)
        mm[:] = arr
        mm.flush()
        del mm
    return path


@contextlib.contextmanager
def one_thread():
    """Tiny nets on a shared 2-core machine: one intra-op thread is far faster (no OpenMP spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def project(tmp_path, monkeypatch):
    path = make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    with one_thread():
        yield params_mod.load(path)


# ---------------------------------------------------------------------------------------------- unit tests

def test_ema_update_math():
    G = torch.nn.Linear(1, 1, bias=False)
    G_ema = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        G.weight.fill_(1.0)
        G_ema.weight.fill_(0.0)
    step.ema_update(G_ema, G, decay=0.9)              # 0 + (1 - 0) * 0.1
    assert G_ema.weight.item() == pytest.approx(0.1)
    with torch.no_grad():
        G.weight.fill_(2.0)
    step.ema_update(G_ema, G, decay=0.9)              # 0.1 + (2 - 0.1) * 0.1 = 0.29
    assert G_ema.weight.item() == pytest.approx(0.29)
    step.ema_update(G_ema, G, decay=1.0)              # decay 1: frozen
    assert G_ema.weight.item() == pytest.approx(0.29)


def test_sampler_is_a_function_of_nimg():
    a, b = data.Sampler(10, seed=3, res_px=8, mirror=True), data.Sampler(10, seed=3, res_px=8, mirror=True)
    idx_a, flip_a = a.indices(16, 4)
    idx_b, flip_b = b.indices(16, 4)                  # fresh sampler, same nimg: same batch (resume)
    assert idx_a.tolist() == idx_b.tolist() and flip_a.tolist() == flip_b.tolist()
    # One epoch = each image once; positions 10..19 are the next epoch's permutation.
    ep0 = np.concatenate([a.indices(n, 2)[0] for n in range(0, 10, 2)])
    assert sorted(ep0.tolist()) == list(range(10))
    ep1 = a.indices(10, 10)[0]
    assert sorted(ep1.tolist()) == list(range(10)) and ep1.tolist() != ep0.tolist()
    # A batch straddling the epoch boundary = end of epoch 0 + start of epoch 1.
    assert a.indices(8, 4)[0].tolist() == ep0[8:].tolist() + ep1[:2].tolist()
    assert data.Sampler(10, 3, 8, mirror=False).indices(0, 10)[1].sum() == 0
    assert data.Sampler(10, 4, 8, mirror=True).indices(0, 10)[0].tolist() != ep0.tolist()   # other seed


def test_to_device_range_layout_and_flip():
    x = torch.zeros(2, 2, 3, 3, dtype=torch.uint8)        # [N, H, W, C]
    x[:, :, 0, :] = 255                                   # left column white
    out = data.to_device(x, torch.tensor([False, True]), torch.device("cpu"))
    assert out.shape == (2, 3, 2, 3) and out.dtype == torch.float32
    assert out[0, :, :, 0].eq(1.0).all() and out[0, :, :, 1:].eq(-1.0).all()
    assert out[1, :, :, 2].eq(1.0).all() and out[1, :, :, :2].eq(-1.0).all()   # flipped: right column


def test_batches_prefetch_equals_inline_and_splits_ranks_strided():
    images = np.arange(12 * 2 * 2 * 3, dtype=np.uint8).reshape(12, 2, 2, 3)
    s = data.Sampler(12, 0, 2, mirror=True)
    inline = [(n, x.clone(), f.clone()) for n, x, f in data.Batches(images, s, 4, 0, 20, prefetch=0)]
    threaded = list(data.Batches(images, s, 4, 0, 20, prefetch=2))
    assert [n for n, _, _ in inline] == [0, 4, 8, 12, 16]
    for (n1, x1, f1), (n2, x2, f2) in zip(inline, threaded):
        assert n1 == n2 and torch.equal(x1, x2) and torch.equal(f1, f2)
    idx, _ = s.indices(4, 4)
    r1 = next(iter(data.Batches(images, s, 4, 4, 8, rank=1, world=2, prefetch=0)))[1]
    assert torch.equal(r1, torch.from_numpy(images[idx[1::2]]))


def test_batches_from_a_resident_level_equal_the_memmap_ones():
    """train.data_on_device: the level held as one tensor gives the same batches (gathered where it lives)."""
    images = np.random.default_rng(0).integers(0, 256, (12, 2, 2, 3), dtype=np.uint8)
    resident = data.resident_level(images, torch.device("cpu"), chunk_bytes=40)   # 3 images per chunk
    assert resident.dtype == torch.uint8 and torch.equal(resident, torch.from_numpy(images))
    s = data.Sampler(12, 0, 2, mirror=True)
    for rank, world in ((0, 1), (1, 2)):
        host = [(n, x.clone(), f.clone()) for n, x, f in data.Batches(images, s, 4, 0, 20, rank, world, prefetch=0)]
        dev = list(data.Batches(resident, s, 4, 0, 20, rank, world, prefetch=2))
        assert len(host) == len(dev) == 5
        for (n1, x1, f1), (n2, x2, f2) in zip(host, dev):
            assert n1 == n2 and torch.equal(x1, x2) and torch.equal(f1, f2)


def test_keep_on_device_decision():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    gib = 2**30
    assert data.keep_on_device("auto", 2 * gib, cuda, free_bytes=8 * gib)          # 1/4 of free memory
    assert not data.keep_on_device("auto", 2 * gib + 1, cuda, free_bytes=8 * gib)
    assert not data.keep_on_device("auto", 1, cpu)                                 # auto: CUDA only
    assert data.keep_on_device(True, 100 * gib, cuda, free_bytes=1) and data.keep_on_device(True, 1, cpu)
    assert not data.keep_on_device(False, 1, cuda, free_bytes=8 * gib)


def test_level_held_in_memory_trains_the_same_checkpoint(tmp_path, monkeypatch):
    """train.data_on_device true (on the CPU: the level copied to RAM) changes where batches are gathered,
    not what they hold: the checkpoint's tensors equal those of the memmap run."""
    ckpts, held = {}, []
    resident_level = data.resident_level
    monkeypatch.setattr(data, "resident_level", lambda *a, **k: held.append(a[0].shape) or resident_level(*a, **k))
    for setting in (False, True):
        root = tmp_path / str(setting)
        path = make_project(root, stages={"4": _stage(8, 0, 0.05), "8": _stage(8, 0, 0.05)},
                            train__data_on_device=setting)
        monkeypatch.chdir(root)
        with one_thread():
            loop.run(params_mod.load(path), res=4)
        ckpts[setting] = torch.load(paths.checkpoint(4), weights_only=True)
    assert held == [(64, 4, 4, 3)]                                     # only the second run held the level
    for name in ("G", "D", "G_ema"):
        for k, v in ckpts[False][name].items():
            assert torch.equal(v, ckpts[True][name][k]), (name, k)


def test_pyramid_level_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProganError, match=r"data/pyramid/8.npy not found: run `progan pyramid` first"):
        data.open_level(8)
    Path("data/pyramid").mkdir(parents=True)
    np.save("data/pyramid/8.npy", np.zeros((3, 4, 4, 3), np.uint8))
    with pytest.raises(ProganError, match=r"expected uint8 \[N, 8, 8, 3\], got uint8 \[3, 4, 4, 3\]"):
        data.open_level(8)


def test_rng_state_round_trip_survives_weights_only(tmp_path):
    import random
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    st = state.get_rng_state()
    checkpoint.save(tmp_path / "rng.pt", {"rng": st})
    expect = (torch.rand(3), np.random.rand(3), random.random())
    st = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    state.set_rng_state(st)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1]) and expect[2] == got[2]


def test_remap_optimizer_state_by_name():
    prev = {"state": {0: {"step": torch.tensor(3.0)}, 1: {"step": torch.tensor(4.0)}},
            "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    new = [("a", torch.ones(2)), ("new", torch.ones(2, 3)), ("b", torch.ones(1))]
    out = state.remap_optimizer_state(prev, ["a", "b"], new)
    assert out["state"][0]["step"] == 3.0 and out["state"][2]["step"] == 4.0
    # the new parameter: zero moments at the step count reached (one Adam for every layer, as official)
    assert out["state"][1]["step"] == 4.0 and out["state"][1]["exp_avg"].shape == (2, 3)
    assert not out["state"][1]["exp_avg"].any() and not out["state"][1]["exp_avg_sq"].any()
    assert out["param_groups"][0]["params"] == [0, 1, 2] and out["param_groups"][0]["lr"] == 0.1
    fresh = state.remap_optimizer_state({"state": {}, "param_groups": prev["param_groups"]}, ["a", "b"], new)
    assert fresh["state"] == {}                                       # nothing carried, nothing made up


def _tf_adam(var, g, m, v, t, lr, beta1, beta2, eps):
    """tf.train.AdamOptimizer's dense update (training_ops ApplyAdam), what the official tfutil.Optimizer runs:
    one t for all variables (beta1_power / beta2_power), eps added to sqrt(v) before nothing else (eps-hat)."""
    lr_t = lr * np.sqrt(1 - beta2**t) / (1 - beta1**t)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    return var - lr_t * m / (np.sqrt(v) + eps), m, v


def test_noreset_a_new_layer_steps_as_in_the_official_never_reset_adam():
    """-noreset (reset_opt_for_new_lod = False): every layer exists from the start under one TF Adam, so a layer that
    first gets gradients after t steps takes its first step with the bias correction of step t + 1 and zero moments:
    about 10 lr (beta2 0.99), not the lr of a fresh Adam. Rebuilt with TF's ApplyAdam and compared."""
    torch.manual_seed(0)
    lr, betas, eps, t = 1e-3, (0.0, 0.99), 1e-8, 400
    old = torch.nn.Parameter(torch.randn(5))
    opt = nets_mod.Adam(lr, betas, eps).make(torch.nn.ParameterList([old]))
    grads = [torch.randn(5) for _ in range(t)]
    for g in grads:                                                    # t steps of the old layer alone
        old.grad = g.clone()
        opt.step()
    new = torch.nn.Parameter(torch.randn(3))
    grown = torch.nn.ParameterList([old, new])
    opt2 = nets_mod.Adam(lr, betas, eps).make(grown)
    opt2.load_state_dict(state.remap_optimizer_state(opt.state_dict(), ["0"], list(grown.named_parameters())))
    start, g_new, g_old = new.detach().clone(), torch.randn(3), torch.randn(5)
    old_before = old.detach().clone()
    new.grad, old.grad = g_new.clone(), g_old.clone()
    opt2.step()
    # the official run: the new variable had zero gradients (zero moments) for t steps
    want_new, _, _ = _tf_adam(start.double().numpy(), g_new.double().numpy(), 0.0, 0.0, t + 1, lr, *betas, eps)
    np.testing.assert_allclose(new.detach().double().numpy(), want_new, rtol=0, atol=1e-7)
    step_new = (new.detach() - start).abs()
    assert torch.all(step_new > 9.5 * lr) and torch.all(step_new < 10.01 * lr)       # ~10 lr, not lr
    # the old layer continues its own moments (replayed with TF's update from the same init)
    torch.manual_seed(0)
    x, m, v = torch.randn(5).double().numpy(), 0.0, 0.0
    for i, g in enumerate(grads + [g_old], 1):
        x, m, v = _tf_adam(x, g.double().numpy(), m, v, i, lr, *betas, eps)
    np.testing.assert_allclose(old.detach().double().numpy(), x, rtol=0, atol=1e-5)    # 401 float32 steps
    assert not torch.equal(old.detach(), old_before)


# ---------------------------------------------------------------------------------------------- the stage

def test_train_4_then_8(project):
    p = project
    info4 = loop.run(p, res=4)
    ck4_path = Path(paths.checkpoint(4))
    for f in (ck4_path, paths.train_json(4), paths.losses_tsv(4), paths.samples_png(4)):
        assert Path(f).is_file(), f
    assert not Path(paths.resume_dir(4)).exists()                 # resume state removed at the end
    ck4 = torch.load(ck4_path, weights_only=True)
    assert ck4["format"] == "progan-checkpoint" and ck4["version"] == 1 and ck4["res_px"] == 4
    assert ck4["cur_nimg"] == 104 and ck4["total_kimg"] == pytest.approx(0.104)   # 13 minibatches of 8
    assert ck4["prev_checkpoint_sha256"] is None and ck4["alpha"] == 1.0
    assert ck4["model"]["latent_dim"] == 16 and ck4["params"]["train.stages.4"]["batch"] == 8 and "evaluate" not in ck4["params"]
    assert ck4["opt_G"]["param_groups"][0]["betas"] == (0.0, 0.99)
    assert info4["kimg"] == pytest.approx(0.104)

    rows = Path(paths.losses_tsv(4)).read_text().splitlines()
    assert rows[0].split("\t") == loop.LOSS_COLUMNS
    assert [r.split("\t")[1] for r in rows[1:]] == ["0.056", "0.104"]           # ticks of 0.05 kimg
    tj = json.loads(Path(paths.train_json(4)).read_text())
    assert set(tj["final"]) == {"d_loss", "g_loss", "gp", "d_real", "d_fake"} and tj["seconds"] > 0
    assert tj["skipped_steps"] == {"skipped_d": 0, "skipped_g": 0}
    assert all(np.isfinite(list(tj["final"].values())))
    grid = np.asarray(Image.open(paths.samples_png(4)))
    assert grid.shape == (16, 16, 3) and grid.dtype == np.uint8                  # 16 images, 4x4 grid of 4 px
    # The grid is G_ema on the fixed latents, uint8 via x*127.5+127.5 rounded and clipped.
    nets4 = nets_mod.build_networks(p, 4)
    nets4.G_ema.load_state_dict(ck4["G_ema"])
    with torch.no_grad():
        expect = nets4.G_ema(step.fixed_latents(p.seed, p.report.grid_images, 16)).mul(127.5).add(127.5).round().clamp(0, 255)
    assert np.array_equal(grid[:4, :4], expect[0].permute(1, 2, 0).to(torch.uint8).numpy())
    assert np.array_equal(grid[4:8, 12:16], expect[7].permute(1, 2, 0).to(torch.uint8).numpy())

    # Stage 8 starts from stage 4: every stage-4 tensor is loaded as is; G_ema's new layers copy G's.
    nets8 = nets_mod.build_networks(p, 8)
    assert nets8.prev_sha256 == sha256_file(ck4_path)
    for name in ("G", "D", "G_ema"):
        own = getattr(nets8, name).state_dict()
        for k, v in ck4[name].items():
            assert torch.equal(own[k], v), (name, k)
    g8, ema8 = nets8.G.state_dict(), nets8.G_ema.state_dict()
    assert nets8.grown_keys and all(torch.equal(g8[k], ema8[k]) for k in nets8.grown_keys)
    assert any(not torch.equal(ck4["G_ema"][k], ck4["G"][k]) for k in ck4["G"])  # EMA really differs from G

    info8 = loop.run(p, res=8)
    ck8 = torch.load(paths.checkpoint(8), weights_only=True)
    assert ck8["prev_checkpoint_sha256"] == sha256_file(ck4_path)
    assert ck8["cur_nimg"] == 104 and ck8["total_kimg"] == pytest.approx(0.208)
    assert info8["grown_keys"] == len(nets8.grown_keys)
    rows8 = [r.split("\t") for r in Path(paths.losses_tsv(8)).read_text().splitlines()[1:]]
    # 50 transition images = minibatches at 0..48 (alpha = nimg / 50); the first tick ends after the one at 48.
    assert [(r[2], float(r[3])) for r in rows8] == [("transition", 0.96), ("stabilize", 1.0)]
    assert float(rows8[0][0]) == pytest.approx(0.104 + 0.056)                   # total kimg continues
    assert np.asarray(Image.open(paths.samples_png(8))).shape == (32, 32, 3)
    # Adam was reset at the start of the stabilize phase (official reset_opt_for_new_lod): minibatches 56..96.
    assert {float(st["step"]) for st in ck8["opt_G"]["state"].values()} == {6.0}
    assert {float(st["step"]) for st in ck8["opt_D"]["state"].values()} == {6.0}
    # The 4x4 block moved on during stage 8 (it was trained, not frozen).
    assert not torch.equal(ck8["G"]["blocks.4.conv.weight"], ck4["G"]["blocks.4.conv.weight"])

    # MLflow (real SQLite store in the project): one metric row per tick with the step in images.
    con = sqlite3.connect(p.root / "mlflow.db")
    steps = [r[0] for r in con.execute("select step from metrics where key='d_loss' order by step")]
    con.close()
    assert steps == [56, 104, 160, 208]


def test_missing_previous_stage(project):
    with pytest.raises(ProganError) as e:
        loop.run(project, res=8)
    assert str(e.value) == "results/4/checkpoint.pt: checkpoint not found; run `progan train --res 4` first"


def test_damaged_previous_checkpoint(project):
    Path("results/4").mkdir(parents=True)
    Path(paths.checkpoint(4)).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ProganError, match=r"results/4/checkpoint.pt: checkpoint is truncated or corrupt \(incomplete zip\)"):
        loop.run(project, res=8)
    checkpoint.save(paths.checkpoint(4), {"format": "progan-checkpoint", "version": 7})
    with pytest.raises(ProganError, match=r"checkpoint version 7, this code reads version 1"):
        loop.run(project, res=8)


def test_nan_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    """lr 1e30: the first Adam step moves every weight by ~1e30, the next forward overflows."""
    path = make_project(tmp_path, stages={"4": _stage(8, 0, 0.1, lr=1e30), "8": _stage(8, 0.05, 0.05)},
                        mlflow__tracking_uri=NO_MLFLOW, train__max_consecutive_skips=5)
    monkeypatch.chdir(tmp_path)
    with one_thread(), pytest.raises(ProganError) as e:
        loop.run(params_mod.load(path), res=4)
    msg = str(e.value)
    # only the first D step is applied (D's weights jump by ~1e30): from its G step on, every gradient is
    # non-finite and skipped, 7 steps in the first tick
    assert msg.startswith("train 4 px: non-finite loss or gradients in 7 consecutive steps, all skipped")
    assert "at stage kimg 0.056 (stabilize)" in msg
    assert "no snapshot yet" in msg and "lower train.stages.4.lr" in msg and "\n" not in msg
    assert not Path(paths.checkpoint(4)).exists()


def test_optimizer_state_carried_across_stages_by_name(tmp_path, monkeypatch):
    """reset_opt_each_phase false: Adam moments of the 4x4 layers continue in stage 8; new layers start with zero
    moments at the step count reached."""
    path = make_project(tmp_path, stages={"4": _stage(8, 0, 0.016), "8": _stage(8, 0.008, 0.016)},
                        mlflow__tracking_uri=NO_MLFLOW, train__reset_opt_each_phase=False)
    monkeypatch.chdir(tmp_path)
    p = params_mod.load(path)
    with one_thread():
        loop.run(p, res=4)                                          # 2 minibatches
        loop.run(p, res=8)                                          # 1 + 2 minibatches, no reset in between
    ck8 = torch.load(paths.checkpoint(8), weights_only=True)
    names = [n for n, _ in nets_mod.build_networks(p, 8).G.named_parameters()]
    steps = {names[i]: float(st["step"]) for i, st in ck8["opt_G"]["state"].items()}
    # one step count for every layer, as the official run's one Adam (a new layer starts at the count reached)
    assert steps["blocks.4.conv.weight"] == 5.0 and steps["blocks.8.conv1.weight"] == 5.0
    assert "to_rgb.4.weight" in steps and steps["to_rgb.4.weight"] == 3.0   # 2 at 4 px + 1 in the fade (unused at alpha 1)
