"""The paper's networks at 1024 px through `progan import`, against the official construction (issue #27).

    .venv/bin/python bench/bench_official.py [--res 1024] [--fused-scale false|true|both] [--batch 2] [--out FILE]

For each fused_scale: G, D and Gs of the paper's CelebA-HQ configuration (fmap_base 8192, fmap_max 512, latent 512,
RGB; the released karras2018iclr-celebahq-1024x1024.pkl is a Theano-converted network: fused_scale false,
mbstd_group_size 16, lod 0) with random weights in the official layout, pickled as the official tfutil.Network
pickle (tests/official_progan.py), imported with `progan import`, then our G_ema / D (fp32, CPU) against G_paper /
D_paper rebuilt with TensorFlow's own ops (tests/official_progan.py): the same latents, images and scores. Prints the
max error as a fraction of the official images' range (the acceptance: <= 1e-4) and the seconds of every part; a
JSON summary goes to --out. The released files themselves cannot be downloaded here (Google Drive).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import official_progan as O  # noqa: E402
from progan import api, checkpoint, official  # noqa: E402
from progan.model import Discriminator  # noqa: E402


def one(res: int, fused: bool, batch: int, folder: Path) -> dict:
    kw = dict(num_channels=3, resolution=res, label_size=0, fmap_base=8192, fmap_max=512, latent_size=512,
              fused_scale=fused)
    kw_d = {**{k: v for k, v in kw.items() if k != "latent_size"}, "mbstd_group_size": 16}
    t, row = time.perf_counter(), {"res_px": res, "fused_scale": fused, "batch": batch}

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        row[f"{name}_s"] = round(now - t, 2)
        print(f"  {name}: {now - t:.1f} s", flush=True)
        t = now

    G, D, Gs = O.official_networks(kw, kw_d, seed=0)
    lap("random_weights")
    pkl = folder / f"paper-{res}-{'fused' if fused else 'notfused'}.pkl"
    pkl.write_bytes(O.official_pickle(G, D, Gs))
    row["pickle_mb"] = round(pkl.stat().st_size / 2**20, 1)
    lap("pickle")
    info = official.import_pickle(pkl, folder / "imported.pt")
    lap("progan_import")
    del G
    z = np.random.default_rng(1).normal(size=(batch, 512)).astype(np.float32)
    want = O.g_paper(Gs["variables"], kw, z)
    lap("official_G")
    G_ema = api.load_generator(info["out"])
    got = G_ema(torch.from_numpy(z)).numpy()
    lap("our_G_ema")
    span = float(want.max() - want.min())
    row["G_max_error"], row["G_range"] = float(np.abs(got - want).max()), span
    scores_want = O.d_paper(D["variables"], kw_d, want)
    lap("official_D")
    ck = checkpoint.read(info["out"], (checkpoint.CHECKPOINT,), ("D", "model", "res_px"))
    D_ours = Discriminator(checkpoint.model_config(info["out"], ck["model"]), res)
    D_ours.load_state_dict(ck["D"])
    with torch.no_grad():
        scores = D_ours(torch.from_numpy(want)).numpy()
    lap("our_D")
    row["D_max_error"], row["D_scores_range"] = float(np.abs(scores - scores_want).max()), float(np.ptp(scores_want))
    row["G_error_of_range"] = row["G_max_error"] / span
    row["D_error_of_scale"] = row["D_max_error"] / max(float(np.abs(scores_want).max()), 1.0)
    print(f"  G_ema vs Gs: max error {row['G_max_error']:.3g} of an image range {span:.3g} "
          f"({row['G_error_of_range']:.2e}); D: max error {row['D_max_error']:.3g} on scores up to "
          f"{np.abs(scores_want).max():.3g} ({row['D_error_of_scale']:.2e})", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--fused-scale", choices=("false", "true", "both"), default="false",
                    help="the released CelebA-HQ network's is false (default)")
    ap.add_argument("--batch", type=int, default=2, help="latents per forward (D's stddev group: min(16, batch))")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "official.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fused in {"false": [False], "true": [True], "both": [False, True]}[args.fused_scale]:
            print(f"{args.res} px, fused_scale {str(fused).lower()}:", flush=True)
            rows.append(one(args.res, fused, args.batch, Path(tmp)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "threads": torch.get_num_threads(),
                                    "load_average": os.getloadavg()}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["G_error_of_range"] <= 1e-4 and r["D_error_of_scale"] <= 1e-4 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
