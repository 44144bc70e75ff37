"""Using a trained generator: latents, slerp, uint8 conversion, the Python API and `progan generate /
interpolate / export` on tiny nets saved in the training checkpoint format (CPU)."""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import progan
from progan import api, cli
from progan.errors import ProganError
from progan.pictures import image_grid, to_uint8
from progan.model import Generator, ModelConfig

TINY = ModelConfig(latent_dim=16, fmap_base=64, fmap_max=16)
RESOLUTIONS = [4, 8, 16, 32, 64]


def save_checkpoint(path, res_px, seed=0, alpha=1.0, cfg=TINY, **extra):
    """A training checkpoint as progan.train.loop writes it; G and G_ema differ so G_ema is the one used."""
    torch.manual_seed(seed)
    G, G_ema = Generator(cfg, res_px), Generator(cfg, res_px)
    ckpt = {"format": "progan-checkpoint", "version": 1, "res_px": res_px, "model": dataclasses.asdict(cfg),
            "G": G.state_dict(), "D": {"blocks.4.conv.weight": torch.randn(16, 17, 3, 3)},
            "G_ema": G_ema.state_dict(), "opt_G": {}, "opt_D": {}, "cur_nimg": 100, "total_kimg": 0.1,
            "alpha": alpha}
    ckpt.update(extra)
    torch.save(ckpt, path)
    return G_ema


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    out = {}
    for res in RESOLUTIONS:
        out[res] = folder / f"{res}.pt"
        save_checkpoint(out[res], res, seed=res)
    return out


def run_cli(argv, capsys):
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ----------------------------------------------------------------------------------------------- pure helpers

def test_seed_latents_are_one_draw_per_index_from_a_seeded_cpu_generator():
    z = api.seed_latents(7, 5, 16)
    assert z.shape == (5, 16) and z.dtype == torch.float32
    g = torch.Generator().manual_seed(7)                           # hand-made: one randn(16) per index, in order
    assert torch.equal(z, torch.stack([torch.randn(16, generator=g) for _ in range(5)]))
    assert torch.equal(api.seed_latents(7, 2, 16), z[:2])          # prefix: image i does not depend on n
    assert not torch.equal(api.seed_latents(8, 1, 16)[0], z[0])
    with pytest.raises(ProganError, match="seed"):
        api.seed_latents(-1, 1, 16)


def test_slerp_on_known_vectors():
    e0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    e1 = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    # 90 degrees: midpoint is the normalised sum; t = 1/3 is 30 degrees from e0
    assert torch.allclose(api.slerp(e0, 5 * e1, 0.5), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64) / math.sqrt(2),
                          atol=1e-15)
    assert torch.allclose(api.slerp(e0, e1, 1 / 3), torch.tensor([math.cos(math.pi / 6), 0.5, 0.0],
                                                                  dtype=torch.float64), atol=1e-15)
    # random directions: endpoints exact (after normalising), unit norm everywhere, constant angular speed
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, generator=gen, dtype=torch.float64), torch.randn(512, generator=gen, dtype=torch.float64)
    path = api.slerp(a, b, torch.linspace(0, 1, 11, dtype=torch.float64))
    assert path.shape == (11, 512)
    assert torch.equal(path[0], a / a.norm()) and torch.equal(path[-1], b / b.norm())
    assert torch.allclose(path.norm(dim=1), torch.ones(11, dtype=torch.float64), atol=1e-12)
    steps = torch.acos((path[1:] * path[:-1]).sum(1).clamp(-1, 1))
    omega = torch.acos((a / a.norm()) @ (b / b.norm()))
    assert torch.allclose(steps, omega / 10 * torch.ones(10, dtype=torch.float64), atol=1e-7)
    # a straight line would leave the sphere: its midpoint has norm cos(omega / 2) < 1
    assert ((a / a.norm() + b / b.norm()) / 2).norm() < 0.8
    # float32 in, float32 out; same direction is constant; opposite directions have no unique path
    assert api.slerp(a.float(), b.float(), 0.5).dtype == torch.float32
    assert torch.allclose(api.slerp(e0, 3 * e0, [0.0, 0.7]), torch.stack([e0, e0]))
    with pytest.raises(ProganError, match="opposite"):
        api.slerp(e0, -e0, 0.5)
    with pytest.raises(ProganError, match="same length"):
        api.slerp(e0, torch.ones(4), 0.5)


def test_walk_latents_frames_pass_through_every_seed():
    d = 16
    z = api.walk_latents([3, 1, 4], steps=5, latent_dim=d)
    assert z.shape == ((3 - 1) * 5 + 1, d)
    assert torch.allclose(z.norm(dim=1), torch.full((11,), math.sqrt(d)), atol=1e-5)
    for k, seed in enumerate([3, 1, 4]):                            # frame k*steps is seed k's latent direction
        key = api.seed_latents(seed, 1, d)[0]
        assert torch.allclose(z[k * 5], key / key.norm() * math.sqrt(d), atol=1e-6)
    with pytest.raises(ProganError, match="at least 2 seeds"):
        api.walk_latents([3], 5, d)
    with pytest.raises(ProganError, match="steps"):
        api.walk_latents([3, 4], 0, d)


def test_to_uint8_is_the_official_conversion():
    # x*127.5+127.5: -1 -> 0, 1 -> 255, 0 -> 127.5 -> 128 (half to even, like np.rint), 0.5 -> 0 (even),
    # 1.5 -> 2, out of range clipped
    values = torch.tensor([-1.0, 1.0, 0.0, 0.5 / 127.5 - 1, 1.5 / 127.5 - 1, -3.0, 2.0, 0.2])
    x = values.view(1, 1, 2, 4).expand(1, 3, 2, 4).clone()
    x[0, 1] = -x[0, 1]                                              # channel 1 differs: checks NCHW -> NHWC
    u = to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (1, 2, 4, 3)
    assert u[0, :, :, 0].ravel().tolist() == [0, 255, 128, 0, 2, 0, 255, 153]
    assert u[0, :, :, 1].ravel().tolist() == [255, 0, 128, 254, 254, 255, 0, 102]   # 254.5, 253.5 -> 254
    assert np.array_equal(u[..., 0], u[..., 2])


def test_image_grid_layout():
    images = np.stack([np.full((2, 3, 1), i, np.uint8) for i in range(1, 6)])   # 5 images of 2x3
    grid = image_grid(images)
    assert grid.shape == (2 * 2, 3 * 3, 1)                          # ceil(sqrt(5)) = 3 columns, 2 rows
    assert grid[0, 0, 0] == 1 and grid[0, 3, 0] == 2 and grid[1, 8, 0] == 3
    assert grid[2, 0, 0] == 4 and grid[3, 5, 0] == 5
    assert grid[2, 6, 0] == 0 and grid[3, 8, 0] == 0                # the missing 6th cell is black


# -------------------------------------------------------------------------------------------------- the API

@pytest.mark.parametrize("res", RESOLUTIONS)
def test_sample_shapes_range_and_determinism_at_every_resolution(ckpts, res):
    G = progan.load_generator(ckpts[res], device="cpu")
    assert (G.res_px, G.latent_dim, G.num_channels, G.device, G.alpha) == (res, 16, 3, torch.device("cpu"), 1.0)
    images = G.sample(6, seed=1)
    assert images.dtype == np.uint8 and images.shape == (6, res, res, 3)
    assert images.std() > 0 and len({im.tobytes() for im in images}) == 6   # distinct, not constant
    assert np.array_equal(images, G.sample(6, seed=1))              # same seed, same images
    assert not np.array_equal(images, G.sample(6, seed=2))
    x = G(G.latents(6, seed=1))                                     # the float output, NCHW
    assert x.shape == (6, 3, res, res) and x.dtype == torch.float32 and not x.requires_grad
    assert np.array_equal(to_uint8(x), images)
    assert np.array_equal(G(G.latents(6, seed=1).numpy()).numpy(), x.numpy())   # arrays are accepted too


def test_batch_size_changes_no_latent_and_at_most_float_rounding(ckpts):
    G = progan.load_generator(ckpts[16])
    ref = G.sample(13, seed=5, batch=13)
    assert np.array_equal(ref, G.sample(13, seed=5, batch=13))      # bit-identical for the same batch
    for batch in (1, 4, 64):
        other = G.sample(13, seed=5, batch=batch)
        diff = np.abs(other.astype(int) - ref)
        # Batched CPU/GPU kernels sum in a shape-dependent order (~1e-6): a value on a .5 boundary may round
        # the other way. Latents are identical, so that is the only difference.
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (batch, diff.max(), (diff > 0).mean())
    assert np.array_equal(G.images(G.latents(13, 5), batch=13)[:4], ref[:4])


def test_uses_g_ema_and_the_saved_alpha(tmp_path):
    path = tmp_path / "fading.pt"
    G_ema = save_checkpoint(path, 16, seed=3, alpha=0.25)
    G = progan.load_generator(path)
    z = G.latents(3, seed=0)
    assert G.alpha == 0.25
    with torch.no_grad():
        assert torch.equal(G(z), G_ema(z, 0.25))
        assert not torch.equal(G(z), G_ema(z, 1.0))


def test_interpolate_keyframes_are_the_seeds_images(ckpts):
    G = progan.load_generator(ckpts[32])
    frames = G.interpolate([2, 9], steps=4)
    assert frames.shape == (5, 32, 32, 3)
    for k, seed in enumerate([2, 9]):                               # same direction, radius sqrt(d) vs |z|
        assert np.abs(frames[k * 4].astype(int) - G.sample(1, seed=seed)[0]).max() <= 1
    assert len({f.tobytes() for f in frames}) == 5


# -------------------------------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("command", ["generate", "interpolate", "export"])
def test_cli_help(command, capsys):
    rc, out, _ = run_cli([command, "--help"], capsys)
    assert rc == 0 and f"progan {command}" in out and "--checkpoint" in out


def test_cli_generate_writes_the_api_images(ckpts, tmp_path, capsys):
    out = tmp_path / "samples"
    rc, _, err = run_cli(["generate", "--checkpoint", str(ckpts[8]), "--n", "5", "--seed", "3", "--out", str(out),
                          "--grid", "--batch", "2", "--device", "cpu"], capsys)
    assert rc == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"seed3-{i:05d}.png" for i in range(5)] + ["seed3-grid.png"]
    G = progan.load_generator(ckpts[8])
    expected = G.sample(5, seed=3, batch=2)
    got = np.stack([np.asarray(Image.open(out / f"seed3-{i:05d}.png")) for i in range(5)])
    assert np.array_equal(got, expected)
    grid = np.asarray(Image.open(out / "seed3-grid.png"))
    assert grid.shape == (2 * 8, 3 * 8, 3) and np.array_equal(grid[8:16, 0:8], expected[3])
    # same seed again: byte-identical PNGs; no temp files left behind
    first = (out / "seed3-00004.png").read_bytes()
    assert run_cli(["generate", "--checkpoint", str(ckpts[8]), "--n", "5", "--seed", "3", "--out", str(out),
                    "--batch", "2"], capsys)[0] == 0
    assert (out / "seed3-00004.png").read_bytes() == first
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_cli_interpolate_gif(ckpts, tmp_path, capsys):
    gif = tmp_path / "walk.gif"
    rc, _, err = run_cli(["interpolate", "--checkpoint", str(ckpts[16]), "--seeds", "1,2,3", "--steps", "4",
                          "--out", str(gif), "--fps", "20"], capsys)
    assert rc == 0, err
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.size == (16, 16)
        assert im.n_frames == (3 - 1) * 4 + 1
        assert im.info["loop"] == 0 and im.info["duration"] == 50    # loops forever, 1/20 s per frame
    rc, _, err = run_cli(["interpolate", "--checkpoint", str(ckpts[16]), "--seeds", "1,2", "--out",
                          str(tmp_path / "walk.mp4")], capsys)
    assert rc == 1 and ".mp4" in err and "gif" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "walk.mp4").exists()
    rc, _, err = run_cli(["interpolate", "--checkpoint", str(ckpts[16]), "--seeds", "1", "--out", str(gif)], capsys)
    assert rc == 2 and "at least 2" in err                          # argparse usage error


def test_cli_export_round_trip(ckpts, tmp_path, capsys):
    ckpt = tmp_path / "fading.pt"
    save_checkpoint(ckpt, 32, seed=11, alpha=0.5)
    exported = tmp_path / "G.pt"
    rc, _, err = run_cli(["export", "--checkpoint", str(ckpt), "--out", str(exported)], capsys)
    assert rc == 0, err
    obj = torch.load(exported, weights_only=True)
    assert set(obj) == {"format", "version", "res_px", "model", "G_ema", "alpha"}
    assert (obj["format"], obj["version"], obj["res_px"], obj["model"], obj["alpha"]) == \
        ("progan-generator", 1, 32, dataclasses.asdict(TINY), 0.5)
    assert exported.stat().st_size < 0.6 * ckpt.stat().st_size       # no G, D or optimizer state
    a, b = progan.load_generator(ckpt), progan.load_generator(exported)
    assert b.alpha == 0.5 and np.array_equal(a.sample(4, seed=0), b.sample(4, seed=0))
    # the exported file feeds the other commands, and can itself be exported again
    assert run_cli(["generate", "--checkpoint", str(exported), "--n", "1", "--out", str(tmp_path / "s")],
                   capsys)[0] == 0
    assert run_cli(["export", "--checkpoint", str(exported), "--out", str(tmp_path / "G2.pt")], capsys)[0] == 0
    assert torch.load(tmp_path / "G2.pt", weights_only=True)["G_ema"].keys() == obj["G_ema"].keys()
    rc, _, err = run_cli(["export", "--checkpoint", str(ckpt), "--out", str(ckpt)], capsys)
    assert rc == 1 and "checkpoint itself" in err
    assert progan.load_generator(ckpt).res_px == 32                 # untouched


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('PROGAN_EVIL_MARKER', '/nonexistent/x')}",))


def test_cli_errors_are_one_line_naming_the_file(ckpts, tmp_path, capsys, monkeypatch):
    good = ckpts[4]
    bad = {}
    bad["missing.pt"] = None
    (tmp_path / "notes.pt").write_text("hello, not a checkpoint\n")
    bad["notes.pt"] = "not a"
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    bad["truncated.pt"] = "truncated"
    torch.save({"format": "progan-checkpoint", "version": 2, "res_px": 4}, tmp_path / "v2.pt")
    bad["v2.pt"] = "version 2"
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    bad["foreign.pt"] = "not a progan checkpoint"
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PROGAN_EVIL_MARKER", str(marker))
    torch.save({"format": "progan-checkpoint", "payload": _Evil()}, tmp_path / "evil.pt")
    bad["evil.pt"] = "refused"
    bad["missing.pt"] = "not found"
    for name, needle in bad.items():
        path = tmp_path / name
        for argv in (["generate", "--out", str(tmp_path / "o")], ["export", "--out", str(tmp_path / "o.pt")],
                     ["interpolate", "--seeds", "1,2", "--out", str(tmp_path / "o.gif")]):
            rc, _, err = run_cli(argv + ["--checkpoint", str(path)], capsys)
            assert rc == 1, (name, argv)
            assert len(err.strip().splitlines()) == 1 and name in err and needle in err, err
            assert "Traceback" not in err
        with pytest.raises(ProganError, match=needle):
            progan.load_generator(path)
    assert not marker.exists()
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.pt").exists() and not (tmp_path / "o.gif").exists()
    with pytest.raises(ProganError, match="version 2"):           # --debug: the error itself, not one line
        cli.main(["export", "--checkpoint", str(tmp_path / "v2.pt"), "--out", str(tmp_path / "o.pt"), "--debug"])


def test_api_argument_errors(ckpts, tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(ProganError, match="no CUDA device"):
            progan.load_generator(ckpts[4], device="cuda")
    with pytest.raises(ProganError, match="device must be"):
        progan.load_generator(ckpts[4], device="tpu")
    G = progan.load_generator(ckpts[4], device="auto")
    for call in (lambda: G.sample(0), lambda: G.sample(2, seed=-3), lambda: G.sample(2, batch=0)):
        with pytest.raises(ProganError):
            call()
    with pytest.raises(ProganError, match="latents"):
        G(torch.zeros(2, 15))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ProganError, match="not a folder"):
        from progan.generate import generate
        generate(ckpts[4], tmp_path / "file", n=1)


def test_import_progan_is_cheap():
    code = ("import sys, progan; assert callable(progan.load_generator); "
            "print(sorted(m for m in ('mlflow', 'snakemake', 'dvc', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_pickle_refusal_does_not_run_code(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PROGAN_EVIL_MARKER", str(marker))
    evil = tmp_path / "evil_plain.pt"
    evil.write_bytes(pickle.dumps({"format": "progan-generator", "payload": _Evil()}))   # a bare pickle
    with warnings.catch_warnings(record=True) as seen, pytest.raises(ProganError, match="refused"):
        warnings.simplefilter("always")
        progan.load_generator(evil)
    assert not marker.exists()
    # torch's "Detected pickle protocol 4 ..." UserWarning is not passed on: the one error line says it all
    assert [str(w.message) for w in seen if "pickle protocol" in str(w.message)] == []


# ----------------------------------------------------------------------------- huge inputs (issue #33)

def test_latent_batches_are_seed_latents_in_pieces():
    parts = list(api.latent_batches(5, 10, 16, 4))
    assert [len(p) for p in parts] == [4, 4, 2] and torch.equal(torch.cat(parts), api.seed_latents(5, 10, 16))


@pytest.mark.timeout(120)
def test_generate_streams_latents_for_a_huge_n(ckpts, tmp_path, capsys, monkeypatch):
    """--n 100000000: latents are drawn one batch at a time, so PNGs are written at once (all 10^8 latents up
    front were 3.4 GB and no file after 25 s). A Ctrl-C after 6 files stops it; they are the API's images."""
    from progan import generate as gen_mod

    written, real = [], gen_mod.write_png

    def write_png(path, image):
        if len(written) == 6:
            raise KeyboardInterrupt
        real(path, image)
        written.append(path)

    monkeypatch.setattr(gen_mod, "write_png", write_png)
    rc, _, err = run_cli(["generate", "--checkpoint", str(ckpts[4]), "--n", "100000000", "--batch", "4",
                          "--out", str(tmp_path / "o"), "--device", "cpu"], capsys)
    assert rc == 130 and "interrupted" in err
    got = np.stack([np.asarray(Image.open(p)) for p in written])
    assert np.array_equal(got, progan.load_generator(ckpts[4]).sample(6, seed=0, batch=4))


def test_grid_of_too_many_images_is_refused_before_any_work(ckpts, tmp_path, capsys):
    rc, _, err = run_cli(["generate", "--checkpoint", str(ckpts[64]), "--n", "20000", "--grid",
                          "--out", str(tmp_path / "o")], capsys)
    assert rc == 1 and err.strip() == ("progan generate: error: --grid with --n 20000 would be a 9088 px wide "
                                       "picture holding every image; use --grid with --n 16384 or less at 64 px, "
                                       "or leave --grid out")
    assert not (tmp_path / "o").exists()


def test_out_of_memory_is_one_line_naming_the_checkpoint(ckpts, tmp_path, capsys, monkeypatch):
    """torch's CPU allocator failure (a RuntimeError) and numpy's MemoryError: one line naming the file and --batch."""
    for err in (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                             "you tried to allocate 4000000000000 bytes. Error code 12 (Cannot allocate memory)"),
                MemoryError("Unable to allocate 7.28 TiB for an array with shape (1000000000000,) and data type int64")):
        def fail(*args, _err=err, **kwargs):
            raise _err
        monkeypatch.setattr(api, "load_generator", fail)
        rc, _, out = run_cli(["generate", "--checkpoint", str(ckpts[4]), "--out", str(tmp_path / "o"), "--batch",
                              "8"], capsys)
        detail = ("you tried to allocate 4000000000000 bytes" if isinstance(err, RuntimeError) else
                  "Unable to allocate 7.28 TiB for an array with shape (1000000000000,) and data type int64")
        assert rc == 1 and out.strip() == (f"progan generate: error: out of memory ({detail}) with --checkpoint "
                                           f"{ckpts[4]} and --batch 8; lower --batch (or free memory), and check "
                                           f"that file's 'model' settings")
