"""`progan generate`, `progan interpolate`, `progan export`: using a trained generator (G_ema) from the shell.

    progan generate --checkpoint results/64/checkpoint.pt --n 64 --seed 0 --out samples/ [--grid] [--batch 64]
    progan interpolate --checkpoint results/64/checkpoint.pt --seeds 1,2,3 --steps 60 --out walk.gif [--fps 30]
    progan export --checkpoint results/64/checkpoint.pt --out G.pt

Each takes a training checkpoint or an exported generator. The work is in progan.api (the same latents, slerp
and uint8 conversion as the Python API); this module parses flags, writes files (atomically) and reports.
Errors: one line on stderr, exit status 1 (traceback with --debug).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from progan import api, log as log_mod
from progan import checkpoint as ckpt_file      # `checkpoint` names the input path below
from progan.errors import ProganError, cpu_out_of_memory
from progan.fileio import atomic_path
from progan.log import log
from progan.pictures import image_grid

GRID_MAX_SIDE_PX = 8192   # --grid: one picture of every image (64 images at 1024 px, 200 MB in memory)
GIF_MAX_FPS = 50       # GIF delays are whole 1/100 s; browsers slow delays under 0.02 s down to 0.1 s


# ------------------------------------------------------------------------------------------------- writers

def _pil(image: np.ndarray):
    """uint8 [H, W, C] -> PIL image (C 1: grey, 3: RGB, 4: RGBA)."""
    from PIL import Image

    c = image.shape[-1]
    if c == 1:
        return Image.fromarray(image[..., 0], mode="L")
    if c in (3, 4):
        return Image.fromarray(image)
    raise ProganError(f"cannot write images with {c} channels (model.num_channels); 1, 3 or 4 are supported")


def write_png(path: str | Path, image: np.ndarray) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        _pil(image).save(tmp, format="PNG")


def write_gif(path: str | Path, frames: np.ndarray, fps: float) -> None:
    """An animated GIF that loops forever, one frame per image, 1/fps s each (rounded to 1/100 s by the format).
    Pillow merges consecutive identical frames into one longer frame (same total duration)."""
    images = [_pil(f).convert("RGB") for f in frames]
    with atomic_path(path, suffix=".gif") as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=0,
                       duration=round(1000 / fps), disposal=1)


# --------------------------------------------------------------------------------------------------- the work

def generate(checkpoint: str | Path, out_dir: str | Path, n: int = 64, seed: int = 0, grid: bool = False,
             batch: int = 64, device: str = "auto") -> int:
    """Write n PNGs `seed<S>-<i:05d>.png` (i = 0..n-1) to out_dir, and `seed<S>-grid.png` with grid=True.
    Returns the number of files written. Image i depends only on (checkpoint, seed, i) and the device. Latents are
    drawn one batch at a time (api.latent_batches): memory does not grow with n."""
    api.check_seed(seed)
    for name, value in (("--n", n), ("--batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ProganError(f"{name} must be an integer >= 1, got {value!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ProganError(f"--out {out_dir}: exists and is not a folder")
    G = api.load_generator(checkpoint, device=device)
    if grid:
        side_px = math.ceil(math.sqrt(n)) * G.res_px
        if side_px > GRID_MAX_SIDE_PX:
            most = (GRID_MAX_SIDE_PX // G.res_px) ** 2
            raise ProganError(f"--grid with --n {n} would be a {side_px} px wide picture holding every image; use "
                              f"--grid with --n {most} or less at {G.res_px} px, or leave --grid out")
    log.info("generate: %d images of %d px from %s (seed %d, alpha %g) on %s -> %s/",
             n, G.res_px, checkpoint, seed, G.alpha, G.device, out_dir)
    written, kept = 0, []
    with log_mod.progress(total=n, desc="generate", unit="img") as bar:
        for start, z in zip(range(0, n, batch), api.latent_batches(seed, n, G.latent_dim, batch)):
            images = G.images(z, batch=batch)                                  # uint8 [B, H, W, C]
            for i, img in enumerate(images, start):
                write_png(out_dir / f"seed{seed}-{i:05d}.png", img)
            written += len(images)
            if grid:
                kept.append(images)
            bar.update(len(images))
    if grid:
        write_png(out_dir / f"seed{seed}-grid.png", image_grid(np.concatenate(kept)))
        written += 1
    log.info("generate: wrote %d files to %s/", written, out_dir)
    return written


def interpolate(checkpoint: str | Path, out: str | Path, seeds: list[int], steps: int = 60, fps: float = 30.0,
                batch: int = 64, device: str = "auto") -> int:
    """Write a looping GIF of the slerp walk through `seeds` ((len(seeds)-1)*steps + 1 frames, see
    api.walk_latents); returns the number of frames rendered."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix == ".mp4":
        raise ProganError(f"--out {out}: .mp4 needs a video writer (imageio-ffmpeg / PyAV), which is not "
                          f"installed; write a .gif instead")
    if suffix != ".gif":
        raise ProganError(f"--out {out}: only .gif is supported, got {out.suffix or 'no extension'!r}")
    if not 0 < fps <= GIF_MAX_FPS:
        raise ProganError(f"--fps must be in (0, {GIF_MAX_FPS}] (GIF delays are 1/100 s steps), got {fps:g}")
    api.check_walk(seeds, steps)                     # before the (slow) checkpoint load
    G = api.load_generator(checkpoint, device=device)
    z = api.walk_latents(seeds, steps, G.latent_dim)
    log.info("interpolate: %d frames of %d px through seeds %s from %s on %s -> %s",
             len(z), G.res_px, ",".join(map(str, seeds)), checkpoint, G.device, out)
    with log_mod.progress(total=len(z), desc="interpolate", unit="frame") as bar:
        frames = G.images(z, batch=batch, progress=bar.update)
    write_gif(out, frames, fps)
    log.info("interpolate: wrote %s (%d frames, %.1f s at %g fps)", out, len(frames), len(frames) / fps, fps)
    return len(frames)


def export(checkpoint: str | Path, out: str | Path) -> dict:
    """Write G_ema alone: {"format": "progan-generator", "version": 1, "res_px", "model", "G_ema", "alpha"},
    loadable by progan.load_generator. Returns {"out", "bytes", "checkpoint_bytes"}."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and checkpoint.exists() and out.resolve() == checkpoint.resolve():
        raise ProganError(f"--out {out}: is the checkpoint itself; choose another file name")
    if out.exists() and out.is_dir():
        raise ProganError(f"--out {out}: is a folder; give a file name such as {out / 'G.pt'}")
    G = api.load_generator(checkpoint, device="cpu")
    obj = ckpt_file.generator_export(G.net, G.alpha)
    state = obj["G_ema"]
    with atomic_path(out, suffix=".pt") as tmp:
        with open(tmp, "wb") as f:  # a file object keeps the bytes independent of the temp name
            torch.save(obj, f)
        check = ckpt_file.load_generator(tmp, "cpu").G.state_dict()   # never leave a file it cannot read back
        if check.keys() != state.keys() or not all(torch.equal(v, state[k]) for k, v in check.items()):
            raise ProganError(f"--out {out}: the written file does not read back as the same G_ema; nothing written")
    info = {"out": str(out), "bytes": out.stat().st_size, "checkpoint_bytes": checkpoint.stat().st_size}
    log.info("export: %s -> %s: %d px G_ema, %.2f MB (checkpoint %.2f MB, %.0f%%)", checkpoint, out, G.res_px,
             info["bytes"] / 1e6, info["checkpoint_bytes"] / 1e6, 100 * info["bytes"] / info["checkpoint_bytes"])
    return info


# ------------------------------------------------------------------------------------------------------ CLI

def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,3, got {text!r}") from None
    if len(seeds) < 2 or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"expected at least 2 non-negative seeds such as 1,2,3, got {text!r}")
    return seeds


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        return api.check_seed(int(text))
    except (ValueError, ProganError):
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2^63 - 1], got {text!r}") from None


def _common(parser: argparse.ArgumentParser, device: bool = True) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="results/<R>/checkpoint.pt or an exported generator (progan export)")
    if device:
        parser.add_argument("--batch", type=_positive_int, default=64, metavar="N",
                            help="images per forward pass (does not change the images; default 64)")
        parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda",
                            help="auto (default): cuda when present, else cpu; cuda:N picks a GPU")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _run(prog: str, parser: argparse.ArgumentParser, argv: list[str] | None, work) -> int:
    """Parse, run, and turn errors into one line on stderr (exit 1); argparse errors exit 2, --help 0."""
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    log_mod.setup()
    try:
        work(args)
    except ProganError as e:
        if args.debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # anything unexpected: one line, traceback only with --debug
        if args.debug:
            raise
        oom = cpu_out_of_memory(e)
        if oom is not None:
            print(f"{prog}: error: out of memory ({oom}) with --checkpoint {args.checkpoint}"
                  + (f" and --batch {args.batch}; lower --batch" if hasattr(args, "batch") else "")
                  + " (or free memory), and check that file's 'model' settings", file=sys.stderr)
            return 1
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        print(f"{prog}: error: {type(e).__name__}: {first} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; files already written are complete", file=sys.stderr)
        return 130
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    prog = "progan generate"
    p = argparse.ArgumentParser(prog=prog, description="PNG samples from a checkpoint's G_ema: <out>/seed<S>-<i>.png "
                                "for i = 0..n-1; the same seed gives the same images (on the same device).")
    _common(p)
    p.add_argument("--n", type=_positive_int, default=64, metavar="N", help="number of images (default 64)")
    p.add_argument("--seed", type=_seed, default=0, metavar="S",
                   help="latent seed (default 0); image i of a seed does not depend on --n or --batch")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--grid", action="store_true", help="also write <out>/seed<S>-grid.png with all images")
    return _run(prog, p, argv, lambda a: generate(a.checkpoint, a.out, n=a.n, seed=a.seed, grid=a.grid,
                                                  batch=a.batch, device=a.device))


def interpolate_main(argv: list[str] | None = None) -> int:
    prog = "progan interpolate"
    p = argparse.ArgumentParser(prog=prog, description="A looping GIF walking the latent sphere (slerp) through "
                                "the seeds' latents: --steps frames per pair of consecutive seeds, plus the last "
                                "seed's frame, i.e. (len(seeds) - 1) * steps + 1 frames.")
    _common(p)
    p.add_argument("--seeds", type=_seeds, required=True, metavar="S1,S2,...",
                   help="at least 2 seeds; seed S's frame is image 0 of `progan generate --seed S`")
    p.add_argument("--steps", type=_positive_int, default=60, metavar="N",
                   help="frames from one seed to the next (default 60)")
    p.add_argument("--out", required=True, metavar="FILE.gif", help="output GIF (.mp4 is not supported)")
    p.add_argument("--fps", type=float, default=30.0, help=f"frames per second, at most {GIF_MAX_FPS} (default 30)")
    return _run(prog, p, argv, lambda a: interpolate(a.checkpoint, a.out, a.seeds, steps=a.steps, fps=a.fps,
                                                     batch=a.batch, device=a.device))


def export_main(argv: list[str] | None = None) -> int:
    prog = "progan export"
    p = argparse.ArgumentParser(prog=prog, description="Write G_ema alone (no D, no optimizer state), loadable "
                                "by `from progan import load_generator` and by the other commands.")
    _common(p, device=False)
    p.add_argument("--out", required=True, metavar="FILE.pt", help="output file, e.g. G.pt")
    return _run(prog, p, argv, lambda a: export(a.checkpoint, a.out))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(generate_main())
