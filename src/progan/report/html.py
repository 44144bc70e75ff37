"""The report page: one HTML string, images embedded as base64 data URIs, no external resources.

A small script at the end marks `<body>` with `data-images` / `data-broken-images` once the page has
loaded (tests read them from a headless browser's DOM).
"""
from __future__ import annotations

import base64
import html as _html
import io
import json

from PIL import Image

from progan import paths

MIN_DISPLAY_PX = 256      # small grids (4x4 px faces) are shown enlarged, pixelated, at least this wide
MAX_DISPLAY_PX = 768
STRIP_MIN_PX = 960        # the interpolation strip is one long row per path: shown wider

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1280px;
       padding: 0 24px 48px; color: #222; background: #fff; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 36px; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; font-size: 14px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th { background: #f4f4f4; } td.key, th.key { text-align: left; font-family: ui-monospace, monospace; }
img.px { image-rendering: pixelated; max-width: 100%; height: auto; display: block; }
img.plot { max-width: 100%; height: auto; display: block; }
figure { margin: 12px 24px 12px 0; display: inline-block; vertical-align: top; }
figcaption { color: #555; font-size: 13px; margin-top: 4px; }
.note { color: #a60; }
details summary { cursor: pointer; font-weight: 600; }
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (im) { return !im.complete || im.naturalWidth === 0; });
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-broken-images", String(broken.length));
});
"""


def esc(value) -> str:
    return _html.escape(str(value), quote=True)


def fmt(value, digits: int = 4) -> str:
    """Numbers for tables: None -> "n/a", floats to `digits` significant digits."""
    if value is None or value == "":
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return esc(value)


def duration(seconds) -> str:
    """12 s, 4.5 min, 3.2 h."""
    if not isinstance(seconds, (int, float)):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def img(png: bytes, alt: str, cls: str = "px", min_px: int = MIN_DISPLAY_PX, max_px: int = MAX_DISPLAY_PX) -> str:
    """An <img> with the PNG inline; pixel images are enlarged by a whole factor to at least `min_px`
    wide (pixels stay square), then capped at `max_px` (and at the page width)."""
    with Image.open(io.BytesIO(png)) as im:
        width = im.width
    style = ""
    if cls == "px":
        shown = min(width * max(1, min_px // max(width, 1)), max_px)
        style = f' style="width:{shown}px"'
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" alt="{esc(alt)}"{style} src="data:image/png;base64,{data}">'


def table(header: list[str], rows: list[list], key_cols: int = 1) -> str:
    head = "".join(f'<th{" class=key" if i < key_cols else ""}>{esc(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td{" class=key" if i < key_cols else ""}>{fmt(c)}</td>'
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _flat(tree, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(tree, dict):
        return [kv for k, v in tree.items() for kv in _flat(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, tree if isinstance(tree, str) else json.dumps(tree))]


def _summary(stages, inception_keys: list[str]) -> str:
    """The stage table; FID / KID / IS columns where any stage has them, the eval notes (e.g. a stage below
    evaluate.fid.min_res_px, or no Inception weights) under it."""
    means = [k for k in inception_keys if not k.endswith("_std")]
    header = ["stage", "total kimg", "train time", "img/s", "SWD avg \u00d710\u00b3", "real-vs-real floor",
              "MS-SSIM generated", "MS-SSIM real", *means, "evaluate time"]
    rows, notes = [], []
    for s in stages:
        t, ev = s.train, s.eval
        kimg = t.get("total_kimg", s.losses["total_kimg"][-1] if s.losses["total_kimg"] else None)
        rows.append([f"{s.res_px}\u00d7{s.res_px}", kimg, duration(t["seconds"]), t["img_per_s"], ev["swd"]["swd_avg"],
                     ev["swd_real_vs_real"].get("swd_avg"), ev.get("msssim_fake"), ev.get("msssim_real"),
                     *[ev.get(k) for k in means], duration(ev.get("seconds"))])
        notes += [f"{s.res_px}\u00d7{s.res_px}: {n}" for n in ev.get("notes", []) if isinstance(n, str)]
    return table(header, rows) + "".join(f"<p class=note>{esc(n)}</p>" for n in notes)


def page(params, stages, figures: dict[str, bytes], reals_png: bytes, strip_png: bytes | None, strip_note: str,
         swd_header: list[str], swd_rows: list[list], inception_keys: list[str] = ()) -> str:
    """The whole page. `stages`: progan.report.StageResult list, coarsest first."""
    final = stages[-1]
    n_real = int(params.report.grid_images)
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>ProGAN report: {final.res_px}\u00d7{final.res_px}</title><style>{_CSS}</style></head><body>",
        f"<h1>ProGAN run report</h1><p class=sub>Progressive growing of GANs (Karras et al. 2017) on "
        f"{esc(params.data.source)} faces, {stages[0].res_px} \u2192 {final.res_px} px in {len(stages)} stages; "
        f"params digest <code>{esc(params.digest()[:12])}</code></p>",
        '<section id="summary"><h2>Stages</h2>', _summary(stages, list(inception_keys)), "</section>",
        f'<section id="final"><h2>Real vs generated at {final.res_px}\u00d7{final.res_px}</h2>',
        f"<figure>{img(reals_png, f'real images {final.res_px} px')}<figcaption>real: {n_real} images from "
        f"{esc(paths.pyramid_level(final.res_px))} (seeded sample)</figcaption></figure>",
        f"<figure>{img(final.samples_png, f'generated images {final.res_px} px')}<figcaption>generated: G_ema on "
        f"fixed latents ({esc(paths.samples_png(final.res_px))})</figcaption></figure></section>",
        '<section id="interpolation"><h2>Latent interpolation</h2>',
    ]
    if strip_png is not None:
        parts.append(f"<figure>{img(strip_png, 'latent interpolation strip', min_px=STRIP_MIN_PX, max_px=1232)}"
                     f"<figcaption>{esc(strip_note)}</figcaption></figure>")
    else:
        parts.append(f"<p class=note>{esc(strip_note)}</p>")
    parts += [
        "</section>", '<section id="metrics"><h2>SWD and MS-SSIM across stages</h2>',
        f"<figure>{img(figures['swd'], 'SWD and MS-SSIM per stage', 'plot')}</figure>",
        "<p>SWD \u00d710\u00b3 per Laplacian-pyramid level between generated and real images (paper \u00a75.1); "
        "the floor is the same distance between two halves of the real images. n/a: no such level at that stage. "
        f"DVC plots file: <code>{esc(paths.REPORT_SWD_PLOT)}</code>.</p>",
        table(swd_header, swd_rows),
        *([f"<figure>{img(figures['inception'], 'FID, KID and IS per stage', 'plot')}</figure>",
           "<p>TF-Inception FID, KID and Inception Score (torch-fidelity) of the generated images against the "
           "stage's pyramid level; the key names the number of generated images (fid50k: 50,000). Stages below "
           "evaluate.fid.min_res_px have none.</p>"] if "inception" in figures else []),
        "</section>",
        '<section id="losses"><h2>Training curves</h2>',
        f"<figure>{img(figures['losses'], 'losses and alpha per stage', 'plot')}</figure>",
        f"<p>DVC plots file: <code>{esc(paths.REPORT_LOSS_PLOT)}</code>.</p></section>",
        '<section id="samples"><h2>Samples per stage</h2>',
    ]
    for s in stages:
        kimg = s.train.get("total_kimg")
        parts.append(f'<figure id="stage-{s.res_px}">{img(s.samples_png, f"samples {s.res_px} px")}<figcaption>'
                     f"{s.res_px}\u00d7{s.res_px}" + (f", {fmt(float(kimg))} kimg" if kimg is not None else "")
                     + f", SWD avg {fmt(float(s.eval['swd']['swd_avg']))}</figcaption></figure>")
    parts += [
        "</section>", '<section id="params"><h2>Run parameters</h2><details open><summary>params.yaml</summary>',
        table(["key", "value"], [list(kv) for kv in _flat(params.to_dict())], key_cols=2),
        "</details></section>", f"<script>{_SCRIPT}</script></body></html>",
    ]
    return "\n".join(parts) + "\n"
