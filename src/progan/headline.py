"""The numbers people compare runs by, per stage: one flat dict per job, named `<number>_r<stage px>`.

train@R   d_loss_r<R>, g_loss_r<R> (the last tick's means), img_per_s_r<R>
evaluate  swd_avg_r<R>, swd_<level>px_r<R> (every Laplacian level, x1e3), msssim_fake_r<R>, and where computed
          fid<N>_r<R>, kid<N>_r<R>, is<N>_r<R> (N: the number of generated images, as in eval.json)

Each stage writes its dict beside its full record (results/<R>/train_metrics.json beside train.json,
eval_metrics.json beside eval.json): the small files are the stage table's DVC metrics (pipeline.STAGES), so
`dvc exp show` has a few columns per stage, each named once across the run (no `file:key` prefixes). The report
logs the same names to the MLflow parent run (with a few more: the real-vs-real floor, MS-SSIM of the reals, the
KID/IS spreads, seconds), so a column reads the same in both tools.
"""
from __future__ import annotations

import math
import re

INCEPTION_KEY = re.compile(r"^(fid|kid|is)\d+k?(_std)?$")     # fid50k, kid50k_std, is10k, fid400 (metrics/fid.py)
TRAIN_LOSSES = ("d_loss", "g_loss")


def _finite(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def swd_name(key: str) -> str:
    """eval.json's swd keys -> headline names: swd_avg stays, swd_32 (a level) -> swd_32px."""
    return key if key == "swd_avg" else f"swd_{key[len('swd_'):]}px"


def training(info: dict) -> dict[str, float]:
    """train.json -> {d_loss_r16, g_loss_r16, img_per_s_r16}."""
    res = int(info["res_px"])
    final = info.get("final") or {}
    return _finite({**{f"{k}_r{res}": final.get(k) for k in TRAIN_LOSSES},
                    f"img_per_s_r{res}": info.get("img_per_s")})


def evaluation(result: dict) -> dict[str, float]:
    """eval.json -> {swd_avg_r32, swd_32px_r32, swd_16px_r32, msssim_fake_r32, fid10k_r32, kid10k_r32, ...}."""
    res = int(result["res_px"])
    out = {f"{swd_name(k)}_r{res}": v for k, v in (result.get("swd") or {}).items()}
    out[f"msssim_fake_r{res}"] = result.get("msssim_fake")
    out.update({f"{k}_r{res}": v for k, v in result.items() if INCEPTION_KEY.match(k) and not k.endswith("_std")})
    return _finite(out)
