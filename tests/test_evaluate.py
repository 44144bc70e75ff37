"""`progan evaluate`: end to end on a tiny real checkpoint and real CelebA reals, MLflow in a real SQLite store."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from helpers import celeba_faces, tiny_params
from test_train import one_thread
from progan import cli, paths
from progan import evaluate as E
from progan import params as params_mod
from progan.metrics import inception
from progan.checkpoint import CHECKPOINT, VERSION
from progan.model.networks import Generator, ModelConfig
from progan.pictures import to_uint8

RES = 16


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waits on the shared 2-core machine."""
    with one_thread():
        yield


def write_reals(root, n: int, res: int = RES) -> np.ndarray:
    arr = celeba_faces(n, res)
    (root / paths.PYRAMID_DIR).mkdir(parents=True, exist_ok=True)
    np.save(root / paths.pyramid_level(res), arr)
    return arr


def write_checkpoint(root, res: int = RES, total_kimg: float = 1.5) -> Generator:
    torch.manual_seed(0)
    cfg = ModelConfig(latent_dim=16, fmap_base=64, fmap_max=16)
    G = Generator(cfg, res)
    path = root / paths.checkpoint(res)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": CHECKPOINT, "version": VERSION, "res_px": res,
                "model": dataclasses.asdict(cfg), "G_ema": G.state_dict(), "total_kimg": total_kimg}, path)
    return G.eval()


@pytest.fixture
def project(tmp_path, monkeypatch):
    p = tiny_params(tmp_path, size_px=RES)          # evaluate: num_images 64, msssim_pairs 16, batch 32
    write_reals(tmp_path, 80)
    write_checkpoint(tmp_path)
    monkeypatch.chdir(tmp_path)
    return p


def test_latents_do_not_depend_on_count():
    assert torch.equal(E.latents(5, 10, 16)[:4], E.latents(5, 4, 16))


def test_cli_end_to_end_writes_eval_json_and_mlflow(project, tmp_path):
    assert cli.main(["evaluate", "--params", str(project), "--res", str(RES)]) == 0
    result = json.loads((tmp_path / paths.eval_json(RES)).read_text())
    assert result["res_px"] == RES and result["num_images"] == 64 and result["num_reals_available"] == 80
    assert set(result["swd"]) == set(result["swd_real_vs_real"]) == {"swd_16", "swd_avg"}
    assert result["swd"]["swd_avg"] == result["swd"]["swd_16"] > 0
    # an untrained generator is far from the faces; two halves of the same faces are close
    assert result["swd"]["swd_avg"] > 3 * result["swd_real_vs_real"]["swd_avg"]
    assert 0 <= result["msssim_fake"] <= 1 and 0 <= result["msssim_real"] <= 1
    assert result["msssim_pairs_fake"] == 16 and result["msssim_pairs_real"] == 16
    assert result["total_kimg"] == 1.5 and result["seconds"] > 0
    assert not [f for f in (tmp_path / paths.stage_dir(RES)).iterdir() if f.name.startswith(".")]  # no temp left

    from mlflow import MlflowClient

    from progan import tracking
    p = params_mod.load(project)
    client = MlflowClient(tracking_uri=tracking.tracking_uri(p))
    runs = client.search_runs([client.get_experiment_by_name(p.mlflow.experiment).experiment_id])
    child = [r for r in runs if "swd_avg" in r.data.metrics]
    assert len(child) == 1 and child[0].info.status == "FINISHED"
    assert child[0].data.metrics["swd_avg"] == pytest.approx(result["swd"]["swd_avg"])
    assert child[0].data.metrics["msssim_fake"] == pytest.approx(result["msssim_fake"])
    steps = [m.step for m in client.get_metric_history(child[0].info.run_id, "swd_avg")]
    assert steps == [1500]                                                       # step = total images


def test_same_numbers_whatever_the_batch(project, tmp_path):
    """Latents, reals, SWD centres and MS-SSIM pairs do not depend on evaluate.batch (only float rounding
    does: BLAS blocking and the per-batch statistics change the last digits, ~5e-7 relative)."""
    a = E.evaluate(params_mod.load(project), RES)
    b = E.evaluate(params_mod.load(tiny_params(tmp_path, size_px=RES, evaluate__batch=6)), RES)
    for key in ("swd", "swd_real_vs_real", "msssim_fake", "msssim_real", "num_images"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_reals_are_mirrored_like_the_official_metric_script_when_training_was(project, tmp_path):
    """train.mirror_augment: each real is mirrored with p = 1/2 (official util_scripts.py evaluate_metrics
    L199-200, misc.apply_mirror_augment: mask = rand(N) < 0.5; minibatch[mask] = minibatch[mask, :, :, ::-1]),
    seeded, for SWD, the real-vs-real row and MS-SSIM; eval.json says so. The official construction is rebuilt
    here on the chosen reals and scored with the same SWD call."""
    from progan.metrics import swd as swd_mod
    p = params_mod.load(project)
    assert p.train.mirror_augment is True
    result = E.evaluate(p, RES)
    reals = np.load(tmp_path / paths.pyramid_level(RES))
    n, seed = result["num_images"], p.evaluate.seed
    perm = np.random.default_rng(seed).permutation(len(reals))
    chosen = reals[perm].transpose(0, 3, 1, 2).copy()                              # NCHW, as the official code
    mask = E.mirror_mask(seed, len(reals))[perm]                                   # one coin per real image
    chosen[mask] = chosen[mask, :, :, ::-1]                                       # the official line, on NCHW
    chosen = chosen.transpose(0, 2, 3, 1)
    assert result["reals_mirrored"] is True and result["reals_mirrored_count"] == int(mask[:n].sum())
    assert result["reals_mirrored_metrics"] == ["swd", "msssim"]
    assert 0.3 * n < result["reals_mirrored_count"] < 0.7 * n
    opts = dict(descriptors_per_image=p.evaluate.swd_descriptors_per_image, directions=p.evaluate.swd_directions,
                repeats=p.evaluate.swd_repeats, seed=seed, batch=p.evaluate.batch, device=torch.device("cpu"),
                spill_dir=str(tmp_path))
    half = n // 2
    assert result["swd_real_vs_real"] == pytest.approx(swd_mod.swd(chosen[:half], chosen[half:2 * half], **opts),
                                                       rel=1e-6)
    plain = E.evaluate(params_mod.load(tiny_params(tmp_path, size_px=RES, train__mirror_augment=False)), RES)
    assert plain["reals_mirrored"] is False and plain["reals_mirrored_count"] == 0
    assert plain["swd_real_vs_real"] != result["swd_real_vs_real"]                # the mirroring really happened
    plain_reals = reals[np.random.default_rng(seed).permutation(len(reals))]
    assert plain["swd_real_vs_real"] == pytest.approx(swd_mod.swd(plain_reals[:half], plain_reals[half:2 * half],
                                                                  **opts), rel=1e-6)
    assert plain["swd"] != result["swd"] and plain["msssim_real"] != result["msssim_real"]


def test_fakes_are_the_checkpoint_generator_output(project, tmp_path):
    """The images scored are G_ema(latents(seed)) in uint8; MS-SSIM of the pairs is recomputed from them."""
    from progan.metrics import msssim
    G = write_checkpoint(tmp_path)
    z = E.latents(123, 32, 16)
    fakes, score = E.generate(G, z, 20, 16, 8, torch.device("cpu"), RES, str(tmp_path))
    with torch.no_grad():
        expected = to_uint8(G(z))
    np.testing.assert_array_equal(fakes, expected[:20])
    assert score == pytest.approx(msssim.msssim(expected[0::2], expected[1::2], device="cpu"), rel=1e-12)


def test_fewer_reals_than_requested_uses_all_and_records_it(tmp_path, monkeypatch):
    p = tiny_params(tmp_path, size_px=8, evaluate__num_images=64)
    write_reals(tmp_path, 30, res=8)
    write_checkpoint(tmp_path, res=8)
    monkeypatch.chdir(tmp_path)
    result = E.evaluate(params_mod.load(p), 8)
    assert result["num_images"] == 30 and result["num_images_requested"] == 64
    assert result["swd_real_vs_real_images"] == 15 and result["msssim_pairs_real"] == 15
    assert set(result["swd"]) == {"swd_8", "swd_avg"}                     # one level below 16 px
    assert all(math.isfinite(v) for v in result["swd"].values())


@pytest.mark.parametrize("case, message", [
    ("no_checkpoint", "results/16/checkpoint.pt: checkpoint not found"),
    ("no_pyramid", "data/pyramid/16.npy: no real images at 16 px; run `progan pyramid` first"),
    ("bad_pyramid", "data/pyramid/16.npy: expected uint8 [N, 16, 16, 3], got uint8 [10, 8, 8, 3]"),
    ("bad_res", "--res 32: not a training resolution; crop.size 16 gives 4, 8, 16"),
    ("wrong_generator", "results/16/checkpoint.pt: holds a 8 px generator, expected 16 px"),
])
def test_errors_are_one_line_and_keep_previous_results(project, tmp_path, capsys, case, message):
    old = tmp_path / paths.eval_json(RES)
    old.write_text('{"old": true}\n')
    if case == "no_checkpoint":
        (tmp_path / paths.checkpoint(RES)).unlink()
    elif case == "no_pyramid":
        (tmp_path / paths.pyramid_level(RES)).unlink()
    elif case == "bad_pyramid":
        np.save(tmp_path / paths.pyramid_level(RES), np.zeros((10, 8, 8, 3), np.uint8))
    elif case == "wrong_generator":
        write_checkpoint(tmp_path, res=8)
        (tmp_path / paths.checkpoint(8)).replace(tmp_path / paths.checkpoint(RES))
    res = 32 if case == "bad_res" else RES
    assert cli.main(["evaluate", "--params", str(project), "--res", str(res)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"progan evaluate: error: {message}"), err[-1]
    assert "Traceback" not in "\n".join(err)
    assert old.read_text() == '{"old": true}\n'


# ---- FID, KID and IS in `progan evaluate` (the stand-in network: the published weights cannot be fetched here) ----

FID_RES = 32


@pytest.fixture
def fid_project(tmp_path, monkeypatch):
    """A 32 px stage (>= evaluate.fid.min_res_px) with 80 real faces; fid/kid/is of 64 fakes vs those reals."""
    p = tiny_params(tmp_path, size_px=FID_RES, evaluate__metrics=["swd", "msssim", "fid", "kid", "is"],
                    evaluate__fid__num_images=64, evaluate__fid__kid_subset_size=50, evaluate__fid__kid_subsets=10,
                    evaluate__fid__batch=32)
    write_reals(tmp_path, 80, res=FID_RES)
    write_checkpoint(tmp_path, res=FID_RES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(inception.CACHE_ENV, str(tmp_path / "cache"))
    return p


@pytest.fixture
def standin(monkeypatch):
    from helpers import standin_inception

    net = standin_inception()
    calls = []

    def load_network(device, explicit=None, configured_cache=None):
        calls.append(device)
        return net.to(device), "stand-in"
    monkeypatch.setattr(inception, "load_network", load_network)
    return calls


def test_fid_kid_is_land_in_eval_json_and_mlflow_beside_unchanged_swd(fid_project, tmp_path, standin):
    assert cli.main(["evaluate", "--params", str(fid_project), "--res", str(FID_RES)]) == 0
    result = json.loads((tmp_path / paths.eval_json(FID_RES)).read_text())
    for key in ("fid64", "kid64", "kid64_std", "is64", "is64_std"):
        assert math.isfinite(result[key]), key
    assert result["fid64"] > 0 and result["is64"] >= 1
    assert set(result["swd"]) == set(result["swd_real_vs_real"]) == {"swd_32", "swd_16", "swd_avg"}
    for key in ("num_images", "num_images_requested", "num_reals_available", "swd_real_vs_real_images",
                "msssim_fake", "msssim_real", "msssim_pairs_fake", "msssim_pairs_real", "total_kimg", "device",
                "seconds", "res_px"):
        assert key in result, key
    assert result["inception"] == {"metrics": ["fid", "kid", "is"], "num_fakes": 64, "num_reals": 80,
                                   "stats_file": None, "weights_sha256": inception.WEIGHTS.sha256, "kid_subsets": 10,
                                   "is_splits": 10}
    assert result["kid_subset_size"] == 50 and result["notes"] == []

    from mlflow import MlflowClient

    from progan import tracking
    p = params_mod.load(fid_project)
    client = MlflowClient(tracking_uri=tracking.tracking_uri(p))
    runs = client.search_runs([client.get_experiment_by_name(p.mlflow.experiment).experiment_id])
    child = [r for r in runs if "fid64" in r.data.metrics]
    assert len(child) == 1 and child[0].data.metrics["kid64"] == pytest.approx(result["kid64"])
    assert child[0].data.metrics["swd_avg"] == pytest.approx(result["swd"]["swd_avg"])


def test_the_reals_stats_file_is_reused_and_gives_the_same_numbers(fid_project, tmp_path, standin, monkeypatch):
    from progan.metrics import real_stats

    inline = E.evaluate(params_mod.load(fid_project), FID_RES)
    settings = real_stats.InceptionSettings.from_params(params_mod.load(fid_project))
    real_stats.compute_real_stats(paths.pyramid_level(FID_RES), settings)            # what fid-stats@32 runs
    computed = []
    original = real_stats.real_stats_from_level
    monkeypatch.setattr(real_stats, "real_stats_from_level", lambda *a, **k: computed.append(1) or original(*a, **k))
    for _ in range(2):
        reused = E.evaluate(params_mod.load(fid_project), FID_RES)
        assert reused["inception"]["stats_file"] == paths.fid_stats(FID_RES)
        for key in ("fid64", "kid64", "is64"):
            assert reused[key] == inline[key], key
    assert computed == []                                                             # the reals were not redone
    # another level (a new pyramid): the file is stale, the reals are computed here and the line says why
    write_reals(tmp_path, 70, res=FID_RES)
    again = E.evaluate(params_mod.load(fid_project), FID_RES)
    assert computed == [1] and again["inception"]["stats_file"] is None and again["inception"]["num_reals"] == 70


def test_offline_without_weights_one_line_and_swd_msssim_still_land(fid_project, tmp_path, capsys):
    # conftest: no weights in the cache, and the URL is a closed local port (as offline)
    assert cli.main(["evaluate", "--params", str(fid_project), "--res", str(FID_RES)]) == 0
    result = json.loads((tmp_path / paths.eval_json(FID_RES)).read_text())
    assert not [k for k in result if k.startswith(("fid", "kid", "is"))] and "inception" not in result
    assert result["swd"]["swd_avg"] > 0 and 0 <= result["msssim_fake"] <= 1
    dest = tmp_path / "cache" / inception.WEIGHTS.name
    lines = [line for line in capsys.readouterr().err.splitlines() if "Inception weights" in line]
    assert len(lines) == 1 and f"{dest} is missing and cannot be fetched" in lines[0], lines
    assert inception.weights_url() in lines[0] and "fid, kid, is not computed, the other metrics still are" in lines[0]
    assert len(result["notes"]) == 1 and result["notes"][0].startswith("fid, kid, is: not computed: Inception weights")


def test_below_min_res_px_no_inception_and_a_note(project, tmp_path, monkeypatch):
    def must_not_load(*a, **k):
        raise AssertionError("no Inception below evaluate.fid.min_res_px")
    monkeypatch.setattr(inception, "load_network", must_not_load)
    result = E.evaluate(params_mod.load(project), RES)
    assert result["metrics"] == ["swd", "msssim", "fid", "kid"]
    assert result["notes"] == ["fid, kid: not computed at 16 px (below evaluate.fid.min_res_px 32)"]
    assert not [k for k in result if k.startswith(("fid", "kid"))]
