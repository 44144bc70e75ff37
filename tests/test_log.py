"""progress(): a tqdm bar on a terminal; elsewhere (Snakemake's `| tee logs/<job>.log`) plain log lines every
few percent, never a carriage return."""
import io
import logging
import os

from progan import log as log_mod
from progan.log import log, progress


def _lines(fn):
    seen = []

    class Grab(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Grab()
    log.addHandler(handler)
    level, log.level = log.level, logging.INFO
    try:
        fn()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return seen


def test_not_a_terminal_gives_a_line_every_five_percent():
    stream = io.StringIO()                                   # not a terminal, like a pipe into tee

    def run():
        with progress(total=1000, desc="crop", unit="img", file=stream) as bar:
            for _ in range(200):
                bar.update(5)

    lines = _lines(run)
    assert stream.getvalue() == ""                           # nothing redrawn on the stream itself
    assert len(lines) == 21 and all("\r" not in x for x in lines)
    assert lines[0].startswith("crop:   0% 0/1000 img [") and lines[10].startswith("crop:  50% 500/1000 img [")
    assert lines[-1].startswith("crop: 100% 1000/1000 img [")


def test_float_totals_and_disable_none():
    """The training phase bars: kimg floats, `disable=None` (tqdm: hide when not a terminal) gives lines too."""
    def run():
        with progress(total=0.3, initial=0.1, desc="train 16px transition", unit="kimg", disable=None) as bar:
            for _ in range(25):
                bar.update(0.008)

    lines = _lines(run)
    assert lines[0].startswith("train 16px transition:  33% 0.1/0.3 kimg")
    assert lines[-1].startswith("train 16px transition: 100% 0.3/0.3 kimg")
    percent = [int(x.split(":")[1].split("%")[0]) for x in lines]
    assert all(b - a >= 5 for a, b in zip(percent, percent[1:-1])) and len(lines) <= 16    # 0.2 kimg in 5% steps


def test_disable_true_and_unknown_total():
    def run():
        with progress(total=10, desc="hidden", disable=True, file=io.StringIO()) as bar:
            bar.update(10)
        with progress(total=None, desc="download", unit="B", unit_scale=True, file=io.StringIO()) as bar:
            bar.update(12345)

    lines = _lines(run)
    assert not any(x.startswith("hidden") for x in lines)
    assert lines == ["download: 0.00B [00:00, ?B/s]", lines[1]] and lines[1].startswith("download: 12.3kB [")


def test_a_terminal_gets_the_tqdm_bar():
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        bar = progress(total=10, desc="x", file=tty)
        assert type(bar) is log_mod.tqdm and not isinstance(bar, log_mod.PlainProgress)
        bar.close()
    os.close(master)
