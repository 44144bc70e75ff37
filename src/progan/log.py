"""Logging setup shared by every command: one line per event on stderr, tqdm bars that do not collide."""
from __future__ import annotations

import logging
import sys

from tqdm import tqdm

log = logging.getLogger("progan")


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never crash a stage
            self.handleError(record)


def setup(verbose: bool = False) -> None:
    if log.handlers:
        return
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s progan %(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def progress(iterable=None, **kwargs):
    """A tqdm bar on stderr (log lines go through tqdm.write so they do not break it)."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 1.0)
    return tqdm(iterable, **kwargs)
