"""The report's pictures: matplotlib figures (Agg, PNG bytes) and PNG bytes of image grids (progan.pictures).

No file is written here; `progan.report` puts the bytes into the page.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

D_COLOR, G_COLOR, ALPHA_COLOR = "#1f77b4", "#d62728", "#7f7f7f"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on pipeline machines
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    return buf.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] (or [H, W]) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def loss_curves(stages: list[dict]) -> bytes:
    """One panel per stage: D and G loss (left axis) and the fade-in alpha (right axis, 0..1) vs total kimg.

    `stages`: [{"res_px": 16, "total_kimg": array, "d_loss": array, "g_loss": array, "alpha": array}, ...]
    """
    plt = _pyplot()
    cols = min(3, len(stages))
    rows = math.ceil(len(stages) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(stages):]:
        ax.set_visible(False)
    for ax, st in zip(axes.flat, stages):
        x = np.asarray(st["total_kimg"], dtype=float)
        ax.plot(x, st["d_loss"], color=D_COLOR, lw=1.2, label="D loss")
        ax.plot(x, st["g_loss"], color=G_COLOR, lw=1.2, label="G loss")
        ax.set_title(f"{st['res_px']}\u00d7{st['res_px']}")
        ax.set_xlabel("total kimg")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.plot(x, st["alpha"], color=ALPHA_COLOR, lw=1.0, ls="--", label="alpha")
        twin.set_ylim(-0.05, 1.05)
        twin.set_ylabel("alpha (fade-in)", color=ALPHA_COLOR)
        if len(x) == 0:
            ax.text(0.5, 0.5, "no ticks logged", ha="center", va="center", transform=ax.transAxes)
    proxies = [plt.Line2D([], [], color=D_COLOR), plt.Line2D([], [], color=G_COLOR),
               plt.Line2D([], [], color=ALPHA_COLOR, ls="--")]
    fig.legend(proxies, ["D loss", "G loss", "alpha"], loc="upper center", ncol=3, frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _png(fig)


def swd_msssim(stages: list[dict]) -> bytes:
    """Left: SWD x1e3 per Laplacian level across stages (log y), the average in black and the real-vs-real
    floor dashed (paper Table 1 / §5.1). Right: MS-SSIM of generated vs real pairs (paper §5.1, Table 1).

    `stages`: [{"res_px", "swd": {"swd_16": .., "swd_avg": ..}, "floor": {...}, "msssim_fake", "msssim_real"}]
    """
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    res = [st["res_px"] for st in stages]
    levels = sorted({int(k[4:]) for st in stages for k in st["swd"] if k != "swd_avg"}, reverse=True)
    cmap = plt.get_cmap("viridis", max(2, len(levels)))
    for i, level in enumerate(levels):
        pts = [(st["res_px"], st["swd"][f"swd_{level}"]) for st in stages if f"swd_{level}" in st["swd"]]
        ax.plot(*zip(*pts), marker="o", ms=4, lw=1, color=cmap(i), label=f"level {level} px")
    ax.plot(res, [st["swd"]["swd_avg"] for st in stages], marker="s", color="black", lw=2, label="average")
    floor = [(st["res_px"], st["floor"]["swd_avg"]) for st in stages if "swd_avg" in st["floor"]]
    if floor:
        ax.plot(*zip(*floor), color="black", ls="--", lw=1, label="real vs real (floor)")
    _res_axis(ax, res)
    if all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))   # 10, 100 rather than 10^1
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if _lead_digit(v) in (2, 5) else ""))
    ax.set_ylabel("SWD \u00d710\u00b3 (lower is better)")
    ax.set_title("Sliced Wasserstein distance per level")
    ax.legend(fontsize=8, ncol=2)
    for key, label, style in (("msssim_fake", "generated", "-o"), ("msssim_real", "real", "--s")):
        pts = [(st["res_px"], st[key]) for st in stages if st.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts), style, lw=1.5, ms=4, label=label)
    _res_axis(ax2, res)
    ax2.set_ylabel("MS-SSIM (similar to real is best)")
    ax2.set_title("MS-SSIM between image pairs")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def inception_curves(stages: list[dict]) -> bytes | None:
    """FID, KID and IS per stage, one panel each (those computed; KID with its std over subsets as error bars).
    None when no stage has any (all below evaluate.fid.min_res_px, or not selected).

    `stages`: [{"res_px", "fid50k": .., "kid50k": .., "kid50k_std": .., "is50k": .., "is50k_std": ..}]
    """
    keys = []
    for st in stages:
        keys += [k for k in st if k != "res_px" and not k.endswith("_std") and k not in keys]
    if not keys:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.4), squeeze=False)
    res = [st["res_px"] for st in stages]
    titles = {"fid": "FID (lower is better)", "kid": "KID (lower is better)", "is": "Inception Score (higher is better)"}
    for ax, key in zip(axes[0], keys):
        pts = [(st["res_px"], st[key], st.get(f"{key}_std", 0.0)) for st in stages if key in st]
        x, y, err = zip(*pts)
        ax.errorbar(x, y, yerr=err if any(err) else None, marker="o", ms=4, lw=1.5, capsize=3)
        _res_axis(ax, res)
        ax.set_title(titles[key.rstrip("0123456789k")] + f": {key}", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _lead_digit(v: float) -> int:
    return round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0


def _res_axis(ax, res: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(res, [str(r) for r in res])
    ax.minorticks_off()
    ax.set_xlabel("stage resolution (px)")
    ax.grid(alpha=0.3)
