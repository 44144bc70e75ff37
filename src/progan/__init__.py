"""progan-pipeline: ProGAN as a reproducible Snakemake/DVC pipeline.

Python API: `from progan import load_generator; G = load_generator(path); G.sample(n, seed=0)`.
Imported lazily, so `progan <stage>` commands and the Snakefile do not pay for torch until they need it.
"""

__all__ = ["load_generator"]


def __getattr__(name):
    if name == "load_generator":
        from progan.api import load_generator

        return load_generator
    raise AttributeError(f"module 'progan' has no attribute {name!r}")
