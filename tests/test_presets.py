"""The official configurations as presets (workflow/presets/) and `progan init` (issue #13).

The numbers are checked against tables written here from the official config.py files, run through the official
schedules themselves (train.py TrainingSchedule of the TF release; the Theano train.py loop for Table 1),
transcribed below: for every kimg of the official run, which resolution trains, fading in or not, with which
minibatch and learning rate. Each preset's DAG is planned by both front ends.
"""
from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from progan import params as params_mod, pipeline, presets
from progan.train import schedule

from helpers import CELEBA_DIR, REPO, make_workspace, tool_env

# tkarras/progressive_growing_of_gans master config.py L99-103 (presets), L106 (-fp32 max_minibatch_per_gpu),
# train.py L85-101 (TrainingSchedule defaults).
FP32_MAX_MINIBATCH_PER_GPU = {256: 16, 512: 8, 1024: 4}
TF_PRESETS = {
    "v1-1gpu": dict(num_gpus=1, mbstd_group_size=16, minibatch_base=16, minibatch_dict={256: 14, 512: 6, 1024: 3},
                    lrate_dict={}, lod_training_kimg=800, lod_transition_kimg=800, total_kimg=19000),
    "v2-1gpu": dict(num_gpus=1, mbstd_group_size=4, minibatch_base=4,
                    minibatch_dict={4: 128, 8: 128, 16: 128, 32: 64, 64: 32, 128: 16, 256: 8, 512: 4},
                    lrate_dict={1024: 0.0015}, lod_training_kimg=600, lod_transition_kimg=600, total_kimg=12000),
    "v2-2gpus": dict(num_gpus=2, mbstd_group_size=4, minibatch_base=8,
                     minibatch_dict={4: 256, 8: 256, 16: 128, 32: 64, 64: 32, 128: 16, 256: 8},
                     lrate_dict={512: 0.0015, 1024: 0.002}, lod_training_kimg=600, lod_transition_kimg=600,
                     total_kimg=12000),
    "v2-4gpus": dict(num_gpus=4, mbstd_group_size=4, minibatch_base=16,
                     minibatch_dict={4: 512, 8: 256, 16: 128, 32: 64, 64: 32, 128: 16},
                     lrate_dict={256: 0.0015, 512: 0.002, 1024: 0.003}, lod_training_kimg=600,
                     lod_transition_kimg=600, total_kimg=12000),
    "v2-8gpus": dict(num_gpus=8, mbstd_group_size=4, minibatch_base=32,
                     minibatch_dict={4: 512, 8: 256, 16: 128, 32: 64, 64: 32},
                     lrate_dict={128: 0.0015, 256: 0.002, 512: 0.003, 1024: 0.003}, lod_training_kimg=600,
                     lod_transition_kimg=600, total_kimg=12000),
}
# Theano config.py@2609d1f: the baseline dict L41-96 with section 6.1's overrides L140-142 (configs[7]).
TABLE1 = dict(minibatch_default=16, minibatch_overrides={}, learning_rate_max=0.001, rampup_kimg=0,
              lod_training_kimg=800, lod_transition_kimg=800, total_kimg=10000, fmap_base=2048, resolution=128)


def tf_schedule(cur_nimg, resolution_log2, c):
    """train.py L103-127 TrainingSchedule, line by line (lod_initial_resolution 4, lrate_base 0.001)."""
    kimg = cur_nimg / 1000.0
    phase_dur = c["lod_training_kimg"] + c["lod_transition_kimg"]
    phase_idx = int(np.floor(kimg / phase_dur)) if phase_dur > 0 else 0
    phase_kimg = kimg - phase_idx * phase_dur
    lod = resolution_log2
    lod -= np.floor(np.log2(4))
    lod -= phase_idx
    if c["lod_transition_kimg"] > 0:
        lod -= max(phase_kimg - c["lod_training_kimg"], 0.0) / c["lod_transition_kimg"]
    lod = max(lod, 0.0)
    resolution = 2 ** (resolution_log2 - int(np.floor(lod)))
    minibatch = c["minibatch_dict"].get(resolution, c["minibatch_base"])
    minibatch -= minibatch % c["num_gpus"]
    if resolution in FP32_MAX_MINIBATCH_PER_GPU:
        minibatch = min(minibatch, FP32_MAX_MINIBATCH_PER_GPU[resolution] * c["num_gpus"])
    return lod, resolution, minibatch, c["lrate_dict"].get(resolution, 0.001)


def theano_schedule(cur_nimg, resolution_log2, c):
    """Theano train.py L193-210, line by line (misc.rampup(t, 0) is 1: rampup_kimg 0 means no ramp)."""
    T, X = c["lod_training_kimg"], c["lod_transition_kimg"]
    cur_lod = resolution_log2 - 2
    tlod = (cur_nimg / 1000.0) / (T + X)
    cur_lod -= np.floor(tlod)
    cur_lod -= max(1.0 + (np.fmod(tlod, 1.0) - 1.0) * (T + X) / X, 0.0)
    cur_lod = max(cur_lod, 0.0)
    cur_res = 2 ** (resolution_log2 - int(np.floor(cur_lod)))
    return cur_lod, cur_res, c["minibatch_overrides"].get(cur_res, c["minibatch_default"]), c["learning_rate_max"]


def official_stages(schedule, c, size):
    """{res: (batch, lr, transition_kimg, stabilize_kimg)} from the official schedule, sampled at the middle of
    every kimg of the run (every phase boundary is a whole kimg)."""
    out = {}
    for k in range(c["total_kimg"]):
        lod, res, batch, lr = schedule((k + 0.5) * 1000, int(math.log2(size)), c)
        b, l, tr, st = out.get(res, (batch, lr, 0, 0))
        assert (b, l) == (batch, lr)                         # one minibatch and lr per resolution
        fading = lod != np.floor(lod)
        out[res] = (b, l, tr + fading, st + (not fading))
    return out


def _stages(p):
    """{R: (batch, lr, transition_kimg, stabilize_kimg)}; lr is G's, which a test checks equals D's where it matters."""
    return {r: (p.stage(r).batch, schedule.stage_lrs(p.stage(r).lr)[0], p.stage(r).transition_kimg,
                p.stage(r).stabilize_kimg) for r in p.resolutions}


def _load(name):
    return presets.load(name)


def test_every_tf_preset_is_the_official_schedule():
    for dataset, size in (("celeba128", 128), ("celebahq1024", 1024)):
        for preset, c in TF_PRESETS.items():
            name = f"{dataset}-{preset}"
            p = _load(name)
            assert p.crop.size == size and p.resolutions[-1] == size, name
            assert _stages(p) == official_stages(tf_schedule, c, size), name
            assert sum(s[2] + s[3] for s in _stages(p).values()) == c["total_kimg"], name
            assert p.train.gpus == c["num_gpus"] and p.model.mbstd_group_size == c["mbstd_group_size"], name
            # the common official values (networks.py G_paper / D_paper, loss.py, config.py G_opt / D_opt, train.py)
            assert (p.model.latent_dim, p.model.fmap_base, p.model.fmap_max) == (512, 8192, 512), name
            assert (p.train.loss, p.train.gp_weight, p.train.drift_weight, p.train.gp_resolution) == \
                ("wgan-gp", 10.0, 0.001, "dataset"), name
            assert (tuple(p.train.betas), p.train.adam_eps, p.train.ema_decay) == ((0.0, 0.99), 1e-8, 0.999), name
            assert p.train.reset_opt_each_phase and p.train.mirror_augment and not p.train.amp, name
            assert (p.evaluate.num_images, p.evaluate.swd_descriptors_per_image, p.evaluate.swd_directions,
                    p.evaluate.swd_repeats) == (16384, 128, 128, 4), name
            assert p.data.source == ("celeba" if size == 128 else "folder"), name
            assert p.crop.detector == ("mtcnn-torch" if size == 128 else "center"), name


def test_the_v2_1gpu_celeba_preset_by_hand():
    """The issue's numbers: {4:128, 8:128, 16:128, 32:64, 64:32, 128:16}, 12,000 kimg, 6,000 at 128 px."""
    s = _stages(_load("celeba128-v2-1gpu"))
    assert {r: v[0] for r, v in s.items()} == {4: 128, 8: 128, 16: 128, 32: 64, 64: 32, 128: 16}
    assert s[4][2:] == (0, 600) and s[64][2:] == (600, 600) and s[128][2:] == (600, 6000)


def test_the_table1_preset_is_the_theano_section_6_1_config():
    p = _load("paper-table1-celeba128")
    assert _stages(p) == official_stages(theano_schedule, TABLE1, 128)
    assert _stages(p)[128] == (16, 0.001, 800, 2000) and sum(v[2] + v[3] for v in _stages(p).values()) == 10000
    assert p.model.fmap_base == TABLE1["fmap_base"] and p.model.latent_dim == 512 and p.model.fmap_max == 512
    # minibatch stddev over the whole minibatch (mbstat_avg 'all'): one group as large as every stage's batch
    assert {p.stage(r).batch for r in p.resolutions} == {p.model.mbstd_group_size} == {16}
    assert p.crop.detector == "celeba-box" and p.crop.size == 128 and p.data.source == "celeba"
    assert p.train.gpus == 1 and p.train.mirror_augment and p.train.gp_resolution == "dataset"
    # D applies bias and leaky ReLU BEFORE the 2x2 pooling, as the Theano network.py D_paper (WScaleLayer, then
    # Downscale2DLayer): model.fused_scale false; tests/test_official.py checks D against that order op by op
    assert p.model.fused_scale is False


# config.py L55 (`-cifar10`), L61-90 (`-lsun-<category>`, mirror_augment True), each with L100 (v2-1gpu) and L106.
OTHER_TF_DATASETS = {"cifar10-v2-1gpu": (32, "cifar10", False), "lsun256-v2-1gpu": (256, "lsun", True)}
# Theano config.py@2609d1f: the baseline L41-96 with section 6.4.2's overrides L170-177.
PAPER_CIFAR10 = dict(minibatch_default=16, minibatch_overrides={}, learning_rate_max=0.001, rampup_kimg=0,
                     lod_training_kimg=400, lod_transition_kimg=400, total_kimg=15000, fmap_base=4096, resolution=32,
                     iwass_target=750.0, D_training_repeats=1, mirror_augment=False)


def test_the_cifar10_and_lsun_presets_are_the_official_schedule():
    for name, (size, source, mirror) in OTHER_TF_DATASETS.items():
        p = _load(name)
        c = TF_PRESETS["v2-1gpu"]
        assert p.crop.size == size and _stages(p) == official_stages(tf_schedule, c, size), name
        assert sum(s[2] + s[3] for s in _stages(p).values()) == c["total_kimg"], name
        assert p.data.source == source and p.train.mirror_augment == mirror, name
        assert (p.model.latent_dim, p.model.fmap_base, p.model.fmap_max, p.model.mbstd_group_size) == (512, 8192, 512, 4)
        assert (p.train.gp_target, p.train.d_repeats, p.train.lr_rampup_kimg) == (1.0, 1, 0), name
    cifar, lsun = _load("cifar10-v2-1gpu"), _load("lsun256-v2-1gpu")
    assert cifar.crop.detector == "none" and cifar.data.cifar10_split == "train" and "is" in cifar.evaluate.metrics
    assert _stages(cifar)[32] == (64, 0.001, 600, 8400)
    assert lsun.crop.detector == "center" and lsun.data.max_images == 100000 and lsun.data.lsun_category == "bedroom"
    assert _stages(lsun)[256] == (8, 0.001, 600, 4800)       # minibatch_dict[256] 8 (the -fp32 cap is 16)


def test_the_paper_cifar10_preset_is_the_theano_section_6_4_2_config():
    p, c = _load("paper-cifar10"), PAPER_CIFAR10
    assert _stages(p) == official_stages(theano_schedule, c, c["resolution"])
    assert _stages(p)[32] == (16, 0.001, 400, 12600) and sum(v[2] + v[3] for v in _stages(p).values()) == 15000
    assert {tuple(p.stage(r).lr.values()) for r in p.resolutions} == {(0.001, 0.001)}       # G and D
    assert (p.model.fmap_base, p.model.latent_dim, p.model.mbstd_group_size) == (c["fmap_base"], 512, 16)
    assert (p.train.gp_target, p.train.gp_weight, p.train.drift_weight) == (c["iwass_target"], 10.0, 0.001)
    assert (p.train.d_repeats, p.train.lr_rampup_kimg, p.train.mirror_augment) == (1, 0, False)
    assert (p.data.source, p.crop.detector, p.crop.size, p.model.fused_scale) == ("cifar10", "none", 32, False)
    assert "is" in p.evaluate.metrics and p.evaluate.fid.num_images == 50000 and p.evaluate.fid.is_splits == 10


def test_init_dataset_picks_an_lsun_category(tmp_path, capsys):
    out = tmp_path / "params.yaml"
    assert presets.main(["--preset", "lsun256-v2-1gpu", "--dataset", "lsun-car", "--params", str(out)]) == 0
    capsys.readouterr()
    p = params_mod.load(out)
    assert p.data.lsun_category == "car" and p.data.source == "lsun"
    assert "  lsun_category: car     # `-lsun-car` (config.py L69);" in out.read_text()
    for args, message in ((["--preset", "cifar10-v2-1gpu", "--dataset", "lsun-car"], "is not an LSUN one"),
                          (["--preset", "lsun256-v2-1gpu", "--dataset", "lsun-unicorn"], "not one of config.py's")):
        assert presets.main([*args, "--params", str(tmp_path / "x.yaml")]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    # --folder on an LSUN preset is the LMDB folder: the source stays lsun
    (tmp_path / "bedroom_lmdb").mkdir()
    assert presets.main(["--preset", "lsun256-v2-1gpu", "--folder", str(tmp_path / "bedroom_lmdb"), "--params",
                         str(tmp_path / "f.yaml")]) == 0
    f = params_mod.load(tmp_path / "f.yaml")
    assert (f.data.source, f.data.folder) == ("lsun", str(tmp_path / "bedroom_lmdb"))


def test_the_default_params_yaml_is_the_v2_1gpu_celeba_preset_and_says_so():
    text = (REPO / "params.yaml").read_text()
    assert text == presets.preset_path("celeba128-v2-1gpu").read_text()
    assert text.startswith("# preset celeba128-v2-1gpu: CelebA 128 px, official `-preset-v2-1gpu`")
    assert params_mod.load(REPO / "params.yaml").crop.detector == "mtcnn-torch"     # MTCNN stays the default


def test_every_value_of_every_preset_names_its_source():
    for name in presets.names():
        lines = presets.full_text(name).splitlines()
        assert lines[0].startswith(f"# preset {name}: ") and presets.description(name)
        for n, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#") or re.fullmatch(r"[a-z_]+:", line):
                continue
            comment = line.split("#", 1)[1] if "#" in line else ""
            assert comment.strip(), f"{name}.yaml line {n} has no comment: {line!r}"
            assert ("ours" in comment or re.search(r"\.py|config\.py|L\d+|minibatch|lrate", comment)), \
                f"{name}.yaml line {n}: the comment names no source: {line!r}"


def test_init_list_and_help(capsys):
    from progan import cli
    assert cli.main(["init", "--list"]) == 0                       # `progan init` needs no params.yaml
    assert capsys.readouterr().out.splitlines()[0].startswith("celeba128-v1-1gpu ")
    assert presets.main(["--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == presets.names() and len(out) == 14
    assert all(len(line.split(None, 1)) == 2 for line in out)
    with pytest.raises(SystemExit) as e:
        presets.main(["--help"])
    assert e.value.code == 0 and "--preset NAME" in capsys.readouterr().out


def test_init_writes_refuses_to_overwrite_and_forces(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert presets.main(["--preset", "celeba128-v2-8gpus"]) == 0
    text = (tmp_path / "params.yaml").read_text()
    assert text == presets.full_text("celeba128-v2-8gpus")
    assert not (tmp_path / "dvc.yaml").exists()                    # not a project folder: no dvc.yaml
    assert presets.main(["--preset", "celeba128-v2-8gpus"]) == 0   # the same file again: fine
    assert "is already preset celeba128-v2-8gpus; nothing to write" in capsys.readouterr().err
    assert presets.main(["--preset", "celeba128-v1-1gpu"]) == 1
    err = capsys.readouterr().err
    assert "params.yaml: exists with other settings; pass --force" in err and "\n" not in err.strip()
    assert (tmp_path / "params.yaml").read_text() == text
    assert presets.main(["--preset", "celeba128-v1-1gpu", "--force"]) == 0
    assert params_mod.load(tmp_path / "params.yaml").model.mbstd_group_size == 16
    assert presets.main(["--preset", "nope"]) == 1 and "no such preset" in capsys.readouterr().err


def test_init_folder_and_url_change_only_the_data_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "faces").mkdir()
    assert presets.main(["--preset", "paper-table1-celeba128", "--folder", "faces"]) == 0
    p = params_mod.load(tmp_path / "params.yaml")
    assert (p.data.source, p.data.folder) == ("folder", "faces")
    base = presets.full_text("paper-table1-celeba128").splitlines()
    changed = [(a, b) for a, b in zip(base, (tmp_path / "params.yaml").read_text().splitlines()) if a != b]
    assert [a.split(":")[0].strip() for a, _ in changed] == ["source", "folder"]
    assert all("#" in b for _, b in changed)                         # the comments are kept
    # CelebA presets: --url is a mirror of the official zip (source stays celeba, its md5 still checked)
    assert presets.main(["--preset", "celeba128-v2-1gpu", "--url", "https://example.org/celeba.zip",
                         "--params", "m.yaml"]) == 0
    q = params_mod.load(tmp_path / "m.yaml")
    assert (q.data.source, q.data.url) == ("celeba", "https://example.org/celeba.zip")
    # CelebA-HQ cannot be downloaded: the preset needs --folder or --url
    assert presets.main(["--preset", "celebahq1024-v2-1gpu", "--params", "hq.yaml"]) == 1
    assert "cannot be downloaded automatically: pass --folder DIR" in capsys.readouterr().err
    assert presets.main(["--preset", "celebahq1024-v2-1gpu", "--params", "hq.yaml", "--url",
                         "https://example.org/hq.tar"]) == 0
    hq = params_mod.load(tmp_path / "hq.yaml")
    assert (hq.data.source, hq.data.url, hq.data.folder) == ("url", "https://example.org/hq.tar", None)
    assert presets.main(["--preset", "celeba128-v2-1gpu", "--folder", "missing", "--params", "x.yaml"]) == 1
    assert "--folder missing: no such folder" in capsys.readouterr().err


def _plan(ws: Path):
    """(train jobs Snakemake plans, DVC stage names) in a workspace: `snakemake -n` with 8 visible devices
    (CUDA_VISIBLE_DEVICES, as a GPU box would show them) and `dvc stage list`."""
    env = {**tool_env(), "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(8)))}
    sm = subprocess.run(["snakemake", "-n", "--cores", "8", "--resources", "gpu=8", "-s", str(ws / "Snakefile"),
                         "-d", str(ws)], cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    assert sm.returncode == 0, sm.stdout[-2000:] + sm.stderr[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", sm.stdout, re.M))
    if not (ws / ".dvc").exists():
        subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=ws, env=env, check=True, timeout=120)
    dvc = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=ws, env=env, capture_output=True, text=True,
                         timeout=300)
    assert dvc.returncode == 0, dvc.stderr[-3000:]
    return counts, set(dvc.stdout.split())


@pytest.mark.slow
def test_init_writes_each_preset_and_both_front_ends_plan_its_dag(tmp_path):
    """In a project folder, `progan init --preset NAME --force` writes params.yaml and regenerates dvc.yaml when
    the resolutions change (CelebA 128 -> CelebA-HQ 1024 -> Table 1); Snakemake and DVC then plan every stage."""
    ws = make_workspace(tmp_path / "ws")
    size = params_mod.load(ws / "params.yaml").crop.size
    for name in presets.names():
        extra = ["--folder", str(CELEBA_DIR)] if name.startswith("celebahq") else []
        before = (ws / "dvc.yaml").read_text()
        assert presets.main(["--preset", name, "--force", "--params", str(ws / "params.yaml"), *extra]) == 0
        p = params_mod.load(ws / "params.yaml")
        assert (ws / "dvc.yaml").read_text() == pipeline.dvc_yaml(p)
        assert (before != (ws / "dvc.yaml").read_text()) == (p.crop.size != size), name   # follows crop.size
        size = p.crop.size
        counts, dvc_stages = _plan(ws)
        n = len(p.resolutions)
        n_stats = len([r for r in p.resolutions if r >= p.evaluate.fid.min_res_px])       # 32 .. crop.size
        assert counts.get("train") == str(n) and counts.get("evaluate") == str(n), (name, counts)
        assert counts.get("fid_stats") == str(n_stats) and n_stats == n - 3, (name, counts)
        assert counts.get("download") == "1" and counts.get("crop") == "1", (name, counts)
        assert dvc_stages == {j.id for j in pipeline.jobs(p)}, name
        assert f"train@{p.crop.size}" in dvc_stages and len(dvc_stages) == 4 + 2 * n + n_stats
