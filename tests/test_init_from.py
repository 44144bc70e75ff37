"""`train.init_from` (issue #27): the first training stage starts from a checkpoint's G, D and G_ema (an imported
official network here), declared as an input of that job in both front ends (a DVC dep, hashed; a Snakemake input),
refused in one line when the file does not fit params.yaml; and a 2-stage tiny DAG fine-tuning an imported network
through real `snakemake` and real `dvc repro`."""
from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

import official_progan as O
from helpers import make_workspace, tiny_params, tool_env
from test_train import NO_MLFLOW
from progan import checkpoint, official, paths, pipeline
from progan import params as params_mod
from progan.errors import ProganError
from progan.fileio import sha256_file
from progan.model import ModelConfig
from progan.train import nets as nets_mod

OFFICIAL_4PX = dict(num_channels=3, resolution=4, label_size=0, fmap_base=64, fmap_max=16)   # latent 16 = nf(0)
STAGES = {"4": {"batch": 8, "lr": 0.001, "transition_kimg": 0, "stabilize_kimg": 0.016},
          "8": {"batch": 8, "lr": 0.001, "transition_kimg": 0.008, "stabilize_kimg": 0.008}}


def _imported(folder: Path, name: str = "official-4.pt", seed: int = 0) -> Path:
    pkl = folder / "official-4.pkl"
    pkl.write_bytes(O.official_pickle(*O.official_networks(OFFICIAL_4PX, seed=seed)))
    return Path(official.import_pickle(pkl, folder / name)["out"])


def _params(folder: Path, **overrides) -> Path:
    """Tiny 4 -> 8 px params starting from official-4.pt (model.* as the imported network's), centre crops, no MLflow
    (its start-up is most of a tiny job's time; test_workflow.py runs the DAG with it)."""
    settings = dict(crop__detector="center", data__max_images=24, train__stages=STAGES, train__init_from="official-4.pt",
                    train__tick_kimg=0.008, train__snapshot_kimg=1, mlflow__tracking_uri=NO_MLFLOW)
    return tiny_params(folder, size_px=8, **{**settings, **overrides})


def test_the_first_training_job_declares_the_file_in_both_front_ends(tmp_path):
    p = params_mod.load(_params(tmp_path))
    first, second = pipeline.job(p, "train", 4), pipeline.job(p, "train", 8)
    assert first.deps == ["official-4.pt", "data/pyramid/4.npy"] and "official-4.pt" not in second.deps
    assert "train.init_from" in first.params and "train.init_from" in second.params
    assert ("train@4", "train@8") in pipeline.edges(p)
    dvc = yaml.safe_load(pipeline.dvc_yaml(p))["stages"]["train"]
    assert dvc["foreach"]["4"]["prev"] == "official-4.pt"            # DVC hashes it: a new file re-runs train@4
    assert dvc["foreach"]["8"]["prev"] == "results/4/checkpoint.pt" and "${item.prev}" in dvc["do"]["deps"]
    scratch = params_mod.load(_params(tmp_path / "scratch", train__init_from=None))
    assert pipeline.job(scratch, "train", 4).deps == ["data/pyramid/4.npy"]
    with pytest.raises(params_mod.ParamsError, match=r"train.init_from must be null or the path of a checkpoint"):
        params_mod.load(_params(tmp_path / "bad", train__init_from=""))


def test_the_first_stage_starts_from_the_file(tmp_path):
    init = _imported(tmp_path)
    p = params_mod.load(_params(tmp_path))
    nets = nets_mod.build_networks(p, 4)
    ck = checkpoint.read(init, (checkpoint.CHECKPOINT,), checkpoint.INIT_KEYS)
    for net, key in ((nets.G, "G"), (nets.D, "D"), (nets.G_ema, "G_ema")):
        assert all(torch.equal(v, ck[key][k]) for k, v in net.state_dict().items()), key
    assert nets.prev is None and nets.prev_sha256 == sha256_file(init) and nets.grown_keys == []


@pytest.mark.parametrize("change,message", [
    ({"model__fmap_base": 128}, r"made with model.fmap_base 64, params.yaml has 128; fine-tuning keeps the file's "
                                r"networks: set model.fmap_base: 64 in params.yaml"),
    ({"model__fused_scale": False}, r"made with model.fused_scale true, params.yaml has false"),
    ({"train__start_px": 8, "train__stages": {"8": {**STAGES["8"], "transition_kimg": 0}}},
     r"holds 4 px networks, and training starts at train.start_px 8; set train.start_px: 4"),
    ({"train__init_from": "missing.pt"}, r"train.init_from /\S+/missing.pt: no such file"),
    ({"train__init_from": "G.pt"}, r"/G.pt: not a progan checkpoint \(train.init_from\) \(format 'progan-generator'\)"),
])
def test_a_file_that_does_not_fit_is_refused_in_one_line(tmp_path, change, message):
    _imported(tmp_path)
    G = checkpoint.load_generator(tmp_path / "official-4.pt").G
    checkpoint.save(tmp_path / "G.pt", checkpoint.generator_export(G, 1.0))
    p = params_mod.load(_params(tmp_path, **change))
    with pytest.raises(ProganError, match=message) as e:
        nets_mod.build_networks(p, p.start_px)
    assert "\n" not in str(e.value)


# ---- the DAG, both front ends -----------------------------------------------------------------------------------

def _workspace(tmp_path: Path) -> tuple[Path, dict]:
    ws = make_workspace(tmp_path)
    _imported(ws)
    p = params_mod.load(_params(ws))
    (ws / "dvc.yaml").write_text(pipeline.dvc_yaml(p))
    assert dataclasses.asdict(ModelConfig.from_params(p)) == checkpoint.read(
        ws / "official-4.pt", (checkpoint.CHECKPOINT,), ())["model"]
    return ws, {**tool_env(), "PYTHONPATH": str(ws / "src")}


def _run(cmd: list[str], ws: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def _check_fine_tuned(ws: Path) -> None:
    """Stage 4 started from the imported networks (its record names the file's sha256; Adam with beta1 0 moves a
    weight by at most lr * sqrt(t) at step t, and G_ema barely moves), stage 8 grew from stage 4."""
    init = checkpoint.read(ws / "official-4.pt", (checkpoint.CHECKPOINT,), checkpoint.INIT_KEYS)
    ck4 = checkpoint.load_stage(ws / paths.checkpoint(4), 4)
    assert ck4["prev_checkpoint_sha256"] == sha256_file(ws / "official-4.pt") and ck4["params"]["train.init_from"]
    steps, decay = round(16 / 8), params_mod.load(ws / "params.yaml").train.ema_decay     # 0.016 kimg at batch 8
    moved = max((ck4["G"][k] - init["G"][k]).abs().max().item() for k in init["G"])
    assert 0 < moved <= 1.001e-3 * sum((t + 1) ** 0.5 for t in range(steps))
    # G_ema <- G + decay (G_ema - G) after each G step: over `steps` steps G_ema moves by at most
    # (1 - decay^steps) (|G - G_ema| + how far G moved), element by element (it started at the file's G_ema)
    apart = max((init["G"][k] - init["G_ema"][k]).abs().max().item() for k in init["G"])
    moved_ema = max((ck4["G_ema"][k] - init["G_ema"][k]).abs().max().item() for k in init["G_ema"])
    assert 0 < moved_ema <= (1 - decay**steps) * (apart + moved) * 1.001
    ck8 = checkpoint.load_stage(ws / paths.checkpoint(8), 8)
    assert ck8["prev_checkpoint_sha256"] == sha256_file(ws / paths.checkpoint(4))


@pytest.mark.timeout(600)
def test_snakemake_fine_tunes_an_imported_network(tmp_path):
    ws, env = _workspace(tmp_path / "ws")
    snakemake = ["snakemake", "--cores", "2", "-s", str(ws / "Snakefile"), "-d", str(ws)]
    _run([*snakemake, paths.checkpoint(8)], ws, env)
    assert f"G, D and G_ema from train.init_from {ws / 'official-4.pt'}" in (ws / "logs/train_4.log").read_text()
    _check_fine_tuned(ws)
    (ws / "official-4.pt").touch()               # a Snakemake input, compared by checksum: the same bytes re-run nothing
    assert "Nothing to be done" in _run([*snakemake, "-n", paths.checkpoint(8)], ws, env)
    _imported(ws, seed=1)                                               # another network in the same file
    assert "reason: Updated input files: official-4.pt" in _run([*snakemake, "-n", paths.checkpoint(8)], ws, env)


@pytest.mark.timeout(600)
def test_dvc_fine_tunes_an_imported_network(tmp_path):
    ws, env = _workspace(tmp_path / "ws")
    _run(["dvc", "init", "--no-scm", "-q"], ws, env)
    _run(["dvc", "repro", "train@8"], ws, env)
    _check_fine_tuned(ws)
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["train@4"]
    assert {d["path"] for d in lock["deps"]} >= {"official-4.pt", "data/pyramid/4.npy"}
    _imported(ws, seed=1)                                               # another network in the same file
    assert "official-4.pt" in _run(["dvc", "status", "train@4"], ws, env)
