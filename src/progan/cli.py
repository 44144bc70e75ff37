"""`progan`: one subcommand per pipeline stage, plus tools around them. Thin: parse, load params, call.

Every stage command (the stage table's, pipeline.STAGES) takes `--params PATH` (default ./params.yaml), changes
into the folder that holds it (the project root, where data/ and results/ live), keeps a generated dvc.yaml there in
step with params.yaml (pipeline.sync_dvc_yaml), takes the GPU lease of a GPU stage and calls the stage's `run()`.
Errors are one line on stderr and exit status 1; `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from progan import pipeline
from progan.errors import ProganError

# The stage commands are the stage table's (pipeline.STAGES): `progan <name>` runs `run(params, **kwargs)` of the
# stage's module (`add_arguments(parser)` there is optional), with `--res` for per-resolution stages.
# Tools that read params.yaml but are not stages: name -> (module, help).
TOOLS = {
    "track-start": ("progan.tracking", "create the MLflow store, experiment and parent run before jobs start"),
    "dvc-yaml": ("progan.pipeline.dvcfile", "regenerate dvc.yaml from the stage table (pipeline/) and params.yaml"),
}
# What sizes each stage's memory (an out-of-memory error names these keys with their values); {res} is --res.
MEMORY_KEYS = {
    "crop": ("crop.batch_images", "crop.max_image_pixels"),
    "pyramid": ("pyramid.chunk_images", "crop.size"),
    "fid-stats": ("evaluate.fid.batch", "evaluate.fid.max_reals"),
    "train": ("train.stages.{res}.batch", "model.latent_dim", "model.fmap_max"),
    "evaluate": ("evaluate.batch", "evaluate.num_images", "evaluate.fid.batch", "evaluate.fid.num_images"),
    "report": ("report.grid_images",),
}
# Commands that do not read params.yaml: name -> (module, function taking argv, help).
STANDALONE = {
    "init": ("progan.presets", "main", "write params.yaml from an official preset (workflow/presets/; --list)"),
    "demo": ("progan.demo", "main", "run the whole DAG to 32 px with tiny nets on a folder of images (CPU, minutes)"),
    "generate": ("progan.generate", "generate_main", "PNG samples from a checkpoint's G_ema"),
    "interpolate": ("progan.generate", "interpolate_main", "a GIF walking the latent sphere between seeds"),
    "export": ("progan.generate", "export_main", "G_ema alone, small, loadable by progan.load_generator"),
    "import": ("progan.official", "import_main", "an official ProGAN network pickle (G, D, Gs) as a progan checkpoint"),
}


def _parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The CLI. Only the selected command's module is imported (for its extra flags): start-up stays fast."""
    parser = argparse.ArgumentParser(prog="progan", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, _, help_text) in STANDALONE.items():
        sub.add_parser(name, help=help_text, add_help=False)
    commands = {**{name: (s.module, s.help) for name, s in pipeline.STAGES.items()}, **TOOLS}
    for name, (module, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", default="params.yaml", metavar="PATH",
                       help="params file (default: ./params.yaml); its folder is the project root")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        mod = _import_quiet(module) if name == selected else None
        if name in pipeline.STAGES and pipeline.STAGES[name].per_res:     # a module may take it from elsewhere
            p.add_argument("--res", type=int, required=not getattr(mod, "RES_FROM_CHECKPOINT", False), metavar="PX",
                           help="stage resolution in px (4, 8, ...)")
        p.set_defaults(_module=module)
        if mod is not None and hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
    return parser


def _import_quiet(module: str):
    """Import a stage module for its extra CLI flags; a module that does not exist yet adds none."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    from progan import gpus, log, params as params_mod

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in STANDALONE:  # commands that do not read params.yaml parse their own flags
        module, func, _ = STANDALONE[argv[0]]
        return getattr(importlib.import_module(module), func)(argv[1:])
    args = _parser(argv[0] if argv else None).parse_args(argv)
    log.setup()
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    params = None
    try:
        params = params_mod.load(args.params)
        os.chdir(params.root)
        if args.command in pipeline.STAGES:
            from progan import workspace

            workspace.check_for_stage(params.root)
            if pipeline.sync_dvc_yaml(params) and pipeline.under_dvc():
                raise ProganError(f"dvc.yaml did not match params.yaml (its stages follow "
                                  f"{', '.join(pipeline.DAG_SHAPE_KEYS)}) and DVC had planned this run from the old "
                                  f"one; it is rewritten now: run the same dvc command again")
        module = importlib.import_module(args._module)
        kwargs = {k: v for k, v in vars(args).items() if k not in ("command", "params", "debug", "_module")}
        if args.command in gpus.GPU_COMMANDS:
            with gpus.job_lease(args.command, params) as lease:   # the one lease of this process
                module.run(params, **kwargs, lease=lease)
        else:
            module.run(params, **kwargs)
    except ProganError as e:
        if args.debug:
            raise
        print(f"progan {args.command}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # anything unexpected: one line, traceback only with --debug
        if args.debug:
            raise
        from progan.errors import cpu_out_of_memory
        from progan.fileio import disk_full_cause

        oom = cpu_out_of_memory(e)
        if oom is not None:
            print(f"progan {args.command}: error: out of memory ({oom}); {_memory_keys(args, params)}",
                  file=sys.stderr)
            return 1

        full = disk_full_cause(e)                      # writes outside fileio.atomic_path (crop's PNGs)
        if full is not None:
            print(f"progan {args.command}: error: disk full ({full.filename or full.strerror}); free some space "
                  f"and run the same command again (finished outputs are untouched)", file=sys.stderr)
            return 1
        print(f"progan {args.command}: error: {type(e).__name__}: {e} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"progan {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def _memory_keys(args, params) -> str:
    """'the sizes it takes from params.yaml: train.stages.4.batch (now 128), model.latent_dim (now 512), ...; lower
    them (or free memory) and run it again' for the stage that ran out of memory."""
    keys = [k.format(res=getattr(args, "res", "")) for k in MEMORY_KEYS.get(args.command, ())]
    if params is None or not keys:
        return "free some memory and run the same command again"
    from progan.params import short

    now = ", ".join(f"{k} (now {short(params.get(k))})" for k in keys)
    return f"the sizes it takes from {params.path.name}: {now}; lower them (or free memory) and run it again"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
