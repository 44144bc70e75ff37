"""The few numbers per stage that DVC declares as metrics (progan.headline), and where they go: the stages write
them beside their full records, the stage table declares only them as DVC metrics, and the report logs the same
names to the MLflow parent run."""
import math

import pytest

from progan import headline, params as params_mod, paths, pipeline

from helpers import REPO


def test_evaluation_keeps_what_people_compare():
    result = {"res_px": 32, "num_images": 400, "seconds": 3.2, "total_kimg": 14.0, "device": "cpu",
              "swd": {"swd_32": 106.0, "swd_16": 249.0, "swd_avg": 177.5},
              "swd_real_vs_real": {"swd_32": 65.4, "swd_16": 142.8, "swd_avg": 104.1},
              "msssim_fake": 0.13, "msssim_real": 0.10, "fid400": 61.5, "kid400": 0.031, "kid400_std": 0.004,
              "reals_mirrored": True, "notes": [], "inception": {"metrics": ["fid", "kid"], "num_fakes": 400}}
    assert headline.evaluation(result) == {"swd_avg_r32": 177.5, "swd_32px_r32": 106.0, "swd_16px_r32": 249.0,
                                           "msssim_fake_r32": 0.13, "fid400_r32": 61.5, "kid400_r32": 0.031}
    below = {"res_px": 4, "swd": {"swd_4": 300.0, "swd_avg": 300.0}, "msssim_fake": None, "fid400": math.nan}
    assert headline.evaluation(below) == {"swd_avg_r4": 300.0, "swd_4px_r4": 300.0}     # None, NaN: left out


def test_training_keeps_final_losses_and_speed():
    info = {"res_px": 16, "kimg": 4.0, "total_kimg": 10.0, "seconds": 12.5, "img_per_s": 320.0, "alpha": 1.0,
            "final": {"d_loss": 0.5, "g_loss": -1.25, "gp": 0.1, "d_real": 2.0, "d_fake": 1.0},
            "skipped_steps": {"skipped_d": 0, "skipped_g": 0}, "ticks": 8, "gpus": 1, "device": "cpu",
            "resumed_from_kimg": None, "grown_keys": 6}
    assert headline.training(info) == {"d_loss_r16": 0.5, "g_loss_r16": -1.25, "img_per_s_r16": 320.0}
    assert headline.training({"res_px": 4, "final": {}, "img_per_s": 9.0}) == {"img_per_s_r4": 9.0}


def test_only_the_headline_files_are_dvc_metrics():
    params = params_mod.load(REPO / "params.yaml")
    metrics = {o.path for j in pipeline.jobs(params) for o in j.outs if o.kind == "metrics"}
    assert metrics == {p(r) for r in params.resolutions for p in (paths.train_metrics_json, paths.eval_metrics_json)}
    kinds = {o.path: o.kind for j in pipeline.jobs(params) for o in j.outs}
    assert kinds[paths.train_json(16)] == kinds[paths.eval_json(16)] == "plain"      # the full records: plain
    assert paths.train_metrics_json(16) not in pipeline.artifacts(params, "train", 16)  # MLflow has them as metrics


@pytest.mark.parametrize("res", [4, 32])
def test_report_logs_the_headline_names_to_the_parent(res):
    from progan import report

    ev = {"res_px": res, "swd": {f"swd_{res}": 2.0, "swd_avg": 2.0}, "swd_real_vs_real": {"swd_avg": 1.0},
          "msssim_fake": 0.2, "msssim_real": 0.25, "kid400": 0.03, "kid400_std": 0.01}
    train = {"res_px": res, "seconds": 5.0, "img_per_s": 100.0, "final": {"d_loss": 1.0, "g_loss": 2.0}}
    stage = report.StageResult(res, {}, [], [], train, ev, b"")
    got = report.summary_metrics([stage])
    assert headline.evaluation(ev).items() <= got.items() and headline.training(train).items() <= got.items()
    assert {f"swd_real_vs_real_avg_r{res}", f"msssim_real_r{res}", f"kid400_std_r{res}",
            f"train_seconds_r{res}"} == set(got) - set(headline.evaluation(ev)) - set(headline.training(train))
