"""Logging setup shared by every command: one line per event on stderr, and progress that suits where stderr goes.

On a terminal `progress` is a tqdm bar redrawn in place (log lines go through tqdm.write so they do not break it).
Anywhere else (Snakemake's `| tee logs/<job>.log`, DVC, a batch system's log file) a redrawn bar would be one line
of carriage returns per stage, so the same tqdm object prints a plain log line instead, every PLAIN_STEP of the
total (tqdm's own `miniters`; the monitor thread's forced refreshes off with `maxinterval`), and at the end:
    12:00:01 progan INFO crop:  45% 180/400 img [00:03<00:04, 50.1 img/s]
"""
from __future__ import annotations

import io
import logging
import sys

from tqdm import tqdm

log = logging.getLogger("progan")
PLAIN_STEP = 0.05                  # a plain progress line every 5% of the total
PLAIN_UNKNOWN_TOTAL_S = 30.0       # ... or every 30 s when the total is not known
PLAIN_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


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


class PlainProgress(tqdm):
    """tqdm whose refreshes are log lines (tqdm's documented way to show a bar elsewhere: override `display`).
    tqdm still decides when to refresh and formats the line (rate, ETA); its own writes (the newline on close)
    go to a scratch buffer."""

    def __init__(self, *args, **kwargs):
        self._plain_last = None
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self):
        d = super().format_dict
        for key in ("n", "total"):               # float totals (kimg): 0.116, not 0.11600000000000002
            if isinstance(d[key], float):
                d[key] = round(d[key], 6)
        return d

    def display(self, msg=None, pos=None):
        if msg == "":                                    # close() of a bar that is not kept: nothing to clear
            return True
        if self.n == self._plain_last:                   # close() after the last update: said already
            return True
        self._plain_last = self.n
        log.info("%s", msg if msg is not None else self.format_meter(**self.format_dict))
        return True


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on stderr when it is a terminal, plain log lines every few percent when it is not.
    `disable=True` hides it either way (`disable=None`, tqdm's "hide when not a terminal", gives the lines)."""
    file = kwargs.pop("file", sys.stderr)
    if kwargs.get("disable") is True:
        return tqdm(iterable, file=file, **kwargs)
    if hasattr(file, "isatty") and file.isatty():
        kwargs.setdefault("dynamic_ncols", True)
        kwargs.setdefault("mininterval", 1.0)
        return tqdm(iterable, file=file, **kwargs)
    total = kwargs.get("total", len(iterable) if hasattr(iterable, "__len__") else None)
    kwargs.update(disable=False, file=io.StringIO(), maxinterval=float("inf"), smoothing=0)   # rate: the average
    if total:
        kwargs.update(miniters=total * PLAIN_STEP, mininterval=0, bar_format=PLAIN_FORMAT)
    else:
        kwargs.update(mininterval=PLAIN_UNKNOWN_TOTAL_S)
    return PlainProgress(iterable, **kwargs)
