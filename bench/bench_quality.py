"""What our training reaches on this CPU (issue #15): SWD against time on real faces, growing vs not, and the official
feature switches one at a time (the paper's Table 1 and Figure 4, at our small scale).

Data: ../shared/data/celeba-aligned-2k (2,010 real CelebA faces; `--images DIR` for another folder), cropped with the
official fixed CelebA box (`celeba-box`) to 32 px and made into the pyramid once, through the real CLI (`progan
download`, `crop`, `pyramid`). Nets: `--nets demo` (latent 64, fmap_base 256, fmap_max 64: the demo's) or `tiny`.
Schedule: batch 16, lr 0.001, `--kimg` K per phase (4 px: K of training; 8, 16, 32 px: K of fade-in and K of
training; 7 K kimg in all), G_ema decay 0.99, everything else the official recipe (workflow/params.demo.yaml).

Each variant is one process that runs `progan.train.loop.training_loop` stage by stage in its own project folder
under bench/out/quality/<variant>/, the data linked in; at fixed points (the end of every phase, and every
`--eval-every-kimg` inside the 32 px stage) it evaluates G_ema with `progan.evaluate.evaluate` exactly as
`progan evaluate --res 32` does: SWD x1e3 (levels 32 and 16, and their average) and MS-SSIM of every real face against
as many fakes, with the real-vs-real floor (two disjoint halves of the reals). An image of a lower stage is
upscaled to 32 px first (nearest, as the official networks' output, networks.py upscale2d), so every point is
comparable. The time of the evaluations is left out of the training's.

The machine is shared and its load uneven, so each point records the training's **CPU seconds** (the process's own,
resource.getrusage: every thread, evaluation excluded) beside wall-clock seconds and the load average; the variants
of a comparison run back to back, one after the other, with `--threads` intra-op threads (1 by default: on a
loaded 2-core machine OpenMP spinning makes 2 threads several times slower). Budgets are in images: every variant
trains the same kimg (`--nogrowing-kimg` to change the no-growing run's), so a run is deterministic with the seed;
only its seconds depend on the machine.

    .venv/bin/python bench/bench_quality.py                                  # growing, 4 -> 32 px
    .venv/bin/python bench/bench_quality.py --compare growing,nogrowing      # the paper's section 6.1 / Fig. 4 claim
    .venv/bin/python bench/bench_quality.py --compare switches               # a Table 1 at our scale (7 runs)
    .venv/bin/python bench/bench_quality.py --compare growing,nowscale --kimg 10 --publish

Writes bench/out/quality/results.json (every point of every variant), table.md, swd.png (SWD vs CPU seconds and vs
kimg, one line per variant, the floor dashed) and samples_<variant>.png (the final 32 px grid of 64 faces);
`--publish` also copies the plot, the table and the growing / nogrowing grids into docs/quality/ (`--docs`) for the
README. `--fid` adds FID/KID at the final point when the Inception weights are present (progan.metrics.inception; a
note says so when they are not). `--collect DIR...` trains nothing: it rebuilds the table, plot and grids from
variants run earlier (DIR/<variant>/result.json), e.g. two runs started side by side with their own `--out`.
Run it by hand: ~10 min of CPU per growing run at --kimg 20, the no-growing one about 1.7x that.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from progan import demo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gp_resolution import progan  # noqa: E402  (one `progan <stage>` runner for the benches)

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "quality"
DOCS = REPO / "docs" / "quality"
CELEBA = REPO.parent / "shared" / "data" / "celeba-aligned-2k"
SIZE = 32
NETS = {"tiny": dict(latent_dim=16, fmap_base=64, fmap_max=16), "demo": dict(latent_dim=64, fmap_base=256, fmap_max=64)}
# The official switches (config.py L109-116 "Disable individual features"), as params.yaml overrides.
VARIANTS = {
    "growing": {},                                                 # the official recipe, every feature on
    "nogrowing": {"train.start_px": SIZE},                         # -nogrowing: one stage at 32 px (schedule below)
    "nopixelnorm": {"model.pixel_norm": False},                    # -nopixelnorm
    "nowscale": {"model.equalized_lr": False},                     # -nowscale
    "noleakyrelu": {"model.leaky_relu": False},                    # -noleakyrelu
    "nombstd": {"model.mbstd_group_size": 0},                      # D_paper mbstd_group_size 0
    "nosmoothing": {"train.ema_decay": 0.0},                       # -nosmoothing
    "noreset": {"train.reset_opt_each_phase": False},              # -noreset
}
SETS = {"switches": ["growing", "nopixelnorm", "nowscale", "noleakyrelu", "nombstd", "nosmoothing", "noreset"],
        "all": list(VARIANTS)}
NO_MLFLOW = "sqlite:////proc/progan-no-mlflow/mlflow.db"           # MLflow off (fails in ms): timing
GRID = 64


def resolutions() -> list[int]:
    return [2**k for k in range(2, SIZE.bit_length())]


def growing_kimg(kimg: float) -> float:
    return kimg * (2 * len(resolutions()) - 1)


def params_for(variant: str, args, n_images: int = 100_000) -> dict:
    p = yaml.safe_load(demo.template())
    p["seed"] = args.seed
    p["model"].update(NETS[args.nets])
    p["data"].update(source="folder", folder=str(Path(args.images).resolve()), max_images=None)
    p["crop"].update(detector="celeba-box", size=SIZE)
    p["train"].update(gpus=0, tick_kimg=0.5, snapshot_kimg=10_000, prefetch=0, ema_decay=0.99)
    p["train"]["stages"] = {str(r): {"batch": 16, "lr": 0.001, "transition_kimg": 0 if r == 4 else args.kimg,
                                     "stabilize_kimg": args.kimg} for r in resolutions()}
    for dotted, value in VARIANTS[variant].items():
        section, key = dotted.split(".")
        p[section][key] = value
    if p["train"]["start_px"] == SIZE:                              # -nogrowing: lod_training = lod_transition = 0
        p["train"]["stages"] = {str(SIZE): {"batch": 16, "lr": 0.001, "transition_kimg": 0,
                                            "stabilize_kimg": args.nogrowing_kimg or growing_kimg(args.kimg)}}
    for item in args.set or []:                                     # --set KEY=VALUE, train.stages.*.KEY for all
        dotted, _, text = item.partition("=")
        *path, key = dotted.split(".")
        nodes = [p]
        for part in path:
            nodes = [n[k] for n in nodes for k in (n if part == "*" else [part]) if k in n]
        if not nodes or not dotted or not _:
            raise SystemExit(f"--set {item}: not KEY=VALUE with a dotted params.yaml key")
        for n in nodes:
            n[key] = yaml.safe_load(text)
    p["evaluate"].update(num_images=n_images, msssim_pairs=1000, metrics=["swd", "msssim"])   # every real face
    p["evaluate"]["fid"].update(num_images=n_images)
    p["report"]["grid_images"] = GRID
    p["mlflow"]["tracking_uri"] = NO_MLFLOW
    return p


def prepare_data(args, env: dict) -> Path:
    """download (list the folder), crop (the official CelebA box) and pyramid, once; the runs link to data/."""
    root = OUT / "data"
    if not (root / "data" / "pyramid" / f"{SIZE}.npy").is_file():
        root.mkdir(parents=True, exist_ok=True)
        (root / "params.yaml").write_text(yaml.safe_dump(params_for("growing", args), sort_keys=False))
        for stage in ("download", "crop", "pyramid"):
            progan(root, stage, env=env)
    return root / "data"


# ---- one variant (the child process) -----------------------------------------------------------------------------

def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Points:
    """The hook training_loop calls once per tick: it evaluates at the fixed points and keeps the clocks."""

    def __init__(self, params, every_kimg: float, final_only: bool = False):
        from progan import evaluate, paths
        from progan.train import schedule

        self.params, self.every_nimg, self.rows = params, int(round(every_kimg * 1000)), []
        self.final_only = final_only
        self.reals = evaluate._open_reals(SIZE)
        self.schedule, self.paths, self.evaluate = schedule, paths, evaluate
        self.cpu0, self.wall0 = _cpu_seconds(), time.time()
        self.eval_cpu = self.eval_wall = 0.0
        self.res = self.sched = self.prev_nimg = None
        self.kimg_before = 0.0                                      # images of the stages before this one

    def start_stage(self, res: int) -> None:
        self.res, self.sched, self.prev_nimg = res, self.schedule.StageSchedule.from_params(self.params, res), 0

    def end_stage(self) -> None:
        self.kimg_before += self.sched.total_nimg / 1000

    def __call__(self, cur_nimg: int, nets, alpha: float) -> None:
        s, prev = self.sched, self.prev_nimg
        self.prev_nimg = cur_nimg
        bounds = {s.transition_nimg, s.total_nimg} - {0}
        crossed_bound = any(prev < b <= cur_nimg for b in bounds)
        crossed_every = self.res == SIZE and cur_nimg // self.every_nimg > prev // self.every_nimg
        final = cur_nimg >= s.total_nimg and self.res == SIZE
        if final or (not self.final_only and (crossed_bound or crossed_every)):
            self.point(cur_nimg, nets, alpha, final=final)

    def point(self, cur_nimg: int, nets, alpha: float, final: bool) -> None:
        train_cpu, train_wall = _cpu_seconds() - self.cpu0 - self.eval_cpu, time.time() - self.wall0 - self.eval_wall
        c0, w0 = _cpu_seconds(), time.time()
        G = _Upscaled(nets.G_ema, SIZE // self.res, alpha)
        ev = self.evaluate.evaluate(_with_metrics(self.params, final), SIZE, inputs=(self.reals, _Trained(G)))
        row = {"res_px": self.res, "stage_kimg": cur_nimg / 1000, "kimg": self.kimg_before + cur_nimg / 1000,
               "alpha": alpha, "phase": self.schedule.phase(self.sched, cur_nimg - 1),
               "train_cpu_s": round(train_cpu, 2), "train_wall_s": round(train_wall, 2),
               "loadavg_1min": round(os.getloadavg()[0], 2), "swd": ev["swd"], "msssim_fake": ev.get("msssim_fake")}
        if final:
            row.update(floor=ev["swd_real_vs_real"], msssim_real=ev.get("msssim_real"), notes=ev.get("notes", []),
                       **{k: v for k, v in ev.items() if k.startswith(("fid", "kid"))})
            self.final_grid(G)
        self.rows.append(row)
        self.eval_cpu += _cpu_seconds() - c0
        self.eval_wall += time.time() - w0
        print(f"  {self.res:2d} px kimg {row['kimg']:6.1f}: SWD avg {ev['swd']['swd_avg']:7.2f}, MS-SSIM "
              f"{row['msssim_fake'] or float('nan'):.3f}; train {train_cpu:6.0f} CPU s, {train_wall:6.0f} s, "
              f"load {row['loadavg_1min']}", flush=True)

    def final_grid(self, G) -> None:
        import torch
        from progan.train import loop, step

        with torch.no_grad():
            fakes = G(step.fixed_latents(self.params.seed, GRID, G.cfg.latent_dim))
        loop.save_grid("samples.png", fakes)


def _with_metrics(params, final: bool):
    """The bench's params with evaluate.metrics for this point: fid and kid at the final one when --fid."""
    if not (final and os.environ.get("BENCH_QUALITY_FID")):
        return params
    from progan import params as params_mod

    data = params.to_dict()
    data["evaluate"]["metrics"] = ["swd", "msssim", "fid", "kid"]
    return params_mod.Params(data, params.path)


class _Upscaled:
    """G_ema at the stage's resolution, its images upscaled to 32 px (nearest, official upscale2d) at the stage's
    alpha: what evaluate.generate calls as G(z)."""

    def __init__(self, G, factor: int, alpha: float):
        self.G, self.factor, self.alpha, self.cfg = G, factor, alpha, G.cfg

    def __call__(self, z):
        import torch.nn.functional as F

        x = self.G(z, self.alpha)
        return x if self.factor == 1 else F.interpolate(x, scale_factor=self.factor, mode="nearest")


class _Trained:
    def __init__(self, G):
        self.G, self.total_kimg = G, 0.0


def run_variant(variant: str, args) -> dict:
    """Train and evaluate one variant here, in bench/out/quality/<variant>/; returns its results."""
    import torch

    from progan import params as params_mod
    from progan.train import loop

    torch.set_num_threads(args.threads)
    root = OUT / variant
    params = params_mod.load(root / "params.yaml")
    os.chdir(root)
    points = Points(params, args.eval_every_kimg, args.final_only)
    infos = []
    for res in params.resolutions:
        points.start_stage(res)
        infos.append(loop.training_loop(params, res, use_cuda=False, on_tick=points))
        points.end_stage()
    return {"variant": variant, "overrides": VARIANTS[variant], "params": params.to_dict(), "points": points.rows,
            "stages": [{k: i[k] for k in ("res_px", "kimg", "seconds", "img_per_s")} for i in infos],
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


# ---- the comparison (the parent process) -------------------------------------------------------------------------

def run_child(variant: str, args, data_dir: Path, env: dict) -> dict:
    import numpy as np

    root = OUT / variant
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    n_images = len(np.load(data_dir / "pyramid" / f"{SIZE}.npy", mmap_mode="r"))
    (root / "params.yaml").write_text(yaml.safe_dump(params_for(variant, args, n_images), sort_keys=False))
    (root / "data").symlink_to(data_dir)
    print(f"{variant}: {VARIANTS[variant] or 'the official recipe'}", flush=True)
    before, load0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg(), time.time()
    cmd = [sys.executable, __file__, "--child", variant, *_child_args(args)]
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed (exit {proc.returncode})")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads((root / "result.json").read_text())
    result.update(process_cpu_s=round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
                  process_wall_s=round(time.time() - t0, 1), loadavg_start=load0, loadavg_end=os.getloadavg())
    return result


def _child_args(args) -> list[str]:
    out = ["--kimg", str(args.kimg), "--nets", args.nets, "--seed", str(args.seed), "--threads", str(args.threads),
           "--eval-every-kimg", str(args.eval_every_kimg), "--images", str(args.images), "--out", str(OUT)]
    out += [f"--set={item}" for item in args.set or []] + (["--final-only"] if args.final_only else [])
    return out + (["--nogrowing-kimg", str(args.nogrowing_kimg)] if args.nogrowing_kimg else [])


def seconds_to_reach(points: list[dict], target: float, clock: str) -> float | None:
    """The first time (linear between points) the SWD average is at or below `target`; None if never."""
    prev = None
    for p in points:
        swd = p["swd"]["swd_avg"]
        if swd <= target:
            if prev is None:
                return p[clock]
            (t0, s0), t1 = prev, p[clock]
            return t0 + (t1 - t0) * (s0 - target) / (s0 - swd) if s0 != swd else t1
        prev = (p[clock], swd)
    return None


def growing_vs_not(runs: dict) -> dict | None:
    """Paper section 6.1 / Fig. 4: how much sooner the growing run reaches the no-growing run's best SWD; and, the
    other way round, how soon each reaches the growing run's best (the answer when growing never gets as low)."""
    if not {"growing", "nogrowing"} <= set(runs):
        return None
    out = {}
    for target_run in ("nogrowing", "growing"):
        best = min(p["swd"]["swd_avg"] for p in runs[target_run]["points"])
        row = {"swd_avg": best}
        for clock in ("train_cpu_s", "train_wall_s", "kimg"):
            t_no = seconds_to_reach(runs["nogrowing"]["points"], best, clock)
            t_grow = seconds_to_reach(runs["growing"]["points"], best, clock)
            row[clock] = {"nogrowing": t_no, "growing": t_grow,
                          "ratio": round(t_no / t_grow, 2) if t_grow and t_no else None}
        row["reached"] = row["train_cpu_s"]["growing"] is not None and row["train_cpu_s"]["nogrowing"] is not None
        out[f"to_{target_run}_best"] = row
    return out


def growing_vs_not_text(g: dict) -> str:
    """The comparison in words (CPU seconds of training; ratio = no-growing's seconds / growing's)."""
    lines = []
    for key, whose in (("to_nogrowing_best", "the no-growing run's"), ("to_growing_best", "the growing run's")):
        row, cpu = g[key], g[key]["train_cpu_s"]
        reach = {k: (f"after {cpu[k]:.0f} CPU s" if cpu[k] is not None else "never, within its budget")
                 for k in ("growing", "nogrowing")}
        lines.append(f"to {whose} best SWD avg {row['swd_avg']:.2f}: growing {reach['growing']}, no-growing "
                     f"{reach['nogrowing']}" + (f" (no-growing / growing: {cpu['ratio']}x)" if cpu["ratio"] else ""))
    return "\n".join(lines)


def caption(result: dict) -> str:
    """What the table's numbers are (read from the runs' own params): the data, the nets, the budget, the load."""
    runs = result["runs"]
    phase_kimg = sorted({r["params"]["train"]["stages"][str(SIZE)]["stabilize_kimg"] for r in runs.values()
                         if r["params"]["train"]["start_px"] < SIZE})
    whole_kimg = sorted({r["params"]["train"]["stages"][str(SIZE)]["stabilize_kimg"] for r in runs.values()
                         if r["params"]["train"]["start_px"] == SIZE})
    model = next(iter(runs.values()))["params"]["model"]
    n_images = sorted({r["params"]["evaluate"]["num_images"] for r in runs.values()})
    loads = [p["loadavg_1min"] for r in runs.values() for p in r["points"]]
    budget = ", ".join([f"{k:g} kimg per phase (7 phases: {growing_kimg(k):g} kimg)" for k in phase_kimg] +
                       [f"the no-growing run one 32 px stage of {k:g} kimg" for k in whole_kimg])
    lrs = sorted({st["lr"] for r in runs.values() for st in r["params"]["train"]["stages"].values()})
    extra = f", lr {' / '.join(f'{lr:g}' for lr in lrs)}" + ("" if lrs == [0.001] else " (official: 0.001)")
    return (f"Final point of each variant: {budget}; nets latent {model['latent_dim']}, fmap "
            f"{model['fmap_base']} / {model['fmap_max']}, minibatch 16{extra}; {', '.join(map(str, n_images))} CelebA faces "
            f"(celeba-box crops, 32 px), one intra-op thread. SWD x1e3 of G_ema against every face (levels 32 and "
            f"16 px and their average; lower is better); MS-SSIM of 1,000 consecutive generated pairs (reals: the same "
            f"number of real pairs). The floor is SWD between two disjoint halves of the faces: half as many images per "
            f"side as the fakes' rows, so it is noisier and can sit above them (level 16). Training CPU and wall seconds exclude the evaluations; the 1-min load average "
            f"of the shared 2-core machine was {min(loads):.1f}-{max(loads):.1f} during the runs.\n\n")


def table(runs: dict) -> str:
    """Markdown: final SWD per level, average, MS-SSIM, kimg and seconds per variant, the real-vs-real floor."""
    levels = [SIZE, SIZE // 2]
    head = ("| variant | " + " | ".join(f"SWD {r}" for r in levels) + " | SWD avg | MS-SSIM | kimg | train CPU s "
            "| train wall s |")
    lines = [head, "|" + "---|" * (len(levels) + 6)]
    floor = None
    for name, run in runs.items():
        last = run["points"][-1]
        floor = floor or (last.get("floor"), last.get("msssim_real"))
        lines.append(f"| {name} | " + " | ".join(f"{last['swd'][f'swd_{r}']:.2f}" for r in levels) +
                     f" | **{last['swd']['swd_avg']:.2f}** | {last['msssim_fake']:.3f} | {last['kimg']:.0f} | "
                     f"{last['train_cpu_s']:.0f} | {last['train_wall_s']:.0f} |")
    if floor and floor[0]:
        lines.append("| real vs real (floor) | " + " | ".join(f"{floor[0][f'swd_{r}']:.2f}" for r in levels) +
                     f" | {floor[0]['swd_avg']:.2f} | {floor[1]:.3f} (reals) | | | |")
    return "\n".join(lines) + "\n"


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    floor = next((p["floor"]["swd_avg"] for r in runs.values() for p in r["points"] if p.get("floor")), None)
    for name, run in runs.items():
        xs = [[p["train_cpu_s"] for p in run["points"]], [p["kimg"] for p in run["points"]]]
        ys = [p["swd"]["swd_avg"] for p in run["points"]]
        style = dict(marker="o", ms=3, lw=2.2 if name in ("growing", "nogrowing") else 1.2, label=name)
        for ax, x in zip(axes, xs):
            ax.plot(x, ys, **style)
    for ax, label in zip(axes, ["training CPU seconds (evaluation excluded)", "kimg (real images shown)"]):
        if floor is not None:
            ax.axhline(floor, color="k", ls="--", lw=1, label=f"real vs real ({floor:.1f})")
        ax.set_xlabel(label)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("SWD x1e3 at 32 px (avg of levels 32, 16)")
    axes[1].legend(fontsize=8)
    fig.suptitle("SWD of G_ema against the 2,010 CelebA faces (lower stages upscaled to 32 px)")
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def portable(text: str) -> str:
    """The published results.json without this machine's folders: paths under the checkout relative to it, the
    shared data as `../shared/data/` (where every checkout finds it)."""
    shared = str(REPO.parent / "shared") + "/"
    return text.replace(str(CELEBA.resolve().parents[1]) + "/", "../shared/").replace(shared, "../shared/").replace(
        str(REPO) + "/", "")


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compare", default="growing",
                    help="comma-separated variants (" + ", ".join(VARIANTS) + ") or a set: switches, all")
    ap.add_argument("--kimg", type=float, default=20.0, help="kimg per phase (fade-in and training), default 20")
    ap.add_argument("--nogrowing-kimg", type=float, default=None, help="the no-growing run's kimg (default: the "
                                                                      "growing run's, 7 x --kimg)")
    ap.add_argument("--eval-every-kimg", type=float, default=10.0, help="SWD points inside the 32 px stage")
    ap.add_argument("--nets", choices=sorted(NETS), default="demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: see the docstring)")
    ap.add_argument("--images", default=str(CELEBA), help="folder of face images (default ../shared/data/celeba-aligned-2k)")
    ap.add_argument("--fid", action="store_true", help="FID/KID at the final point when the Inception weights are present")
    ap.add_argument("--publish", action="store_true", help="copy swd.png, table.md, results.json and the grids of "
                    "growing and nogrowing (the README's; the others stay in --out) to --docs")
    ap.add_argument("--docs", default=str(DOCS), help="where --publish copies to (default docs/quality)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="a params.yaml value for every variant, e.g. train.stages.*.lr=0.002 (repeatable)")
    ap.add_argument("--final-only", action="store_true", help="evaluate at the end of the run only")
    ap.add_argument("--out", default=str(OUT), help="output folder (default bench/out/quality)")
    ap.add_argument("--collect", nargs="+", metavar="DIR", help="no training: the table, plot and grids of the "
                    "--compare variants from DIR/<variant>/result.json (runs made earlier, e.g. side by side)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    OUT = Path(args.out).resolve()
    if args.child:
        result = run_variant(args.child, args)
        (OUT / args.child / "result.json").write_text(json.dumps(result, indent=1))
        return
    names = SETS.get(args.compare) or [v.strip() for v in args.compare.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--compare: unknown variant {unknown[0]} (one of {', '.join(VARIANTS)}, or switches, all)")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "CUDA_VISIBLE_DEVICES": "",
           "TQDM_DISABLE": "1", **({"BENCH_QUALITY_FID": "1"} if args.fid else {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.collect:                                                 # variants trained by earlier runs: no training
        dirs = {}
        for folder in args.collect:
            for name in names:
                if (Path(folder) / name / "result.json").is_file():
                    dirs[name] = Path(folder) / name
        missing = [n for n in names if n not in dirs]
        if missing:
            raise SystemExit(f"--collect: no {missing[0]}/result.json under {', '.join(args.collect)}")
        runs = {name: json.loads((dirs[name] / "result.json").read_text()) for name in names}
    else:
        data_dir = prepare_data(args, env)
        runs = {name: run_child(name, args, data_dir, env) for name in names}    # back to back
        dirs = {name: OUT / name for name in names}
    result = {"args": {k: v for k, v in vars(args).items() if k != "child"}, "size_px": SIZE, "images": str(args.images),
              "runs": runs, "growing_vs_not": growing_vs_not(runs), "seconds": round(time.time() - t0, 1),
              "git": subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"], capture_output=True,
                                    text=True).stdout.strip()}
    (OUT / "results.json").write_text(json.dumps(result, indent=1))
    versus = "\n" + growing_vs_not_text(result["growing_vs_not"]).replace("\n", ";\n") + ".\n" \
        if result["growing_vs_not"] else ""
    (OUT / "table.md").write_text(caption(result) + table(runs) + versus)
    plot(runs, OUT / "swd.png")
    for name in runs:
        if dirs[name] / "samples.png" != OUT / f"samples_{name}.png":
            shutil.copy2(dirs[name] / "samples.png", OUT / f"samples_{name}.png")
    print("\n" + caption(result) + table(runs))
    if result["growing_vs_not"]:
        print(growing_vs_not_text(result["growing_vs_not"]))
    if args.publish:
        docs = Path(args.docs).resolve()
        docs.mkdir(parents=True, exist_ok=True)
        for f in ["swd.png", "table.md", *(f"samples_{n}.png" for n in runs if n in ("growing", "nogrowing"))]:
            shutil.copy2(OUT / f, docs / f)
        (docs / "results.json").write_text(portable(json.dumps(result, indent=1)))
    print(f"({time.time() - t0:.0f} s) -> {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
