"""Decode ahead in threads, in input order, holding at most a budget of decoded bytes (the crop stage's reader).

`batches(items, decode, batch, budget_bytes)` yields lists of `decode(item, ticket)` results in input order, at
most `batch` per list, while threads decode the next items. A decoder calls `ticket.reserve(nbytes)` once it
knows how large its pixels will be (after reading the header) and before it allocates them; `reserve` waits
until the bytes fit under the budget, in input order. The bytes stay reserved until the caller has finished
with the list that holds the result (the generator resumes) or the decoder calls `ticket.release()` (it kept
no pixels). So memory is bounded by the budget whatever the image sizes, plus the images being decoded.

No deadlock: tickets are reserved in input order, so the only bytes an item can wait for are those of the
batch being collected; when the next item waits for them, that batch is yielded early (shorter than `batch`).
An item larger than the whole budget goes through alone.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Iterator, TypeVar

T, R = TypeVar("T"), TypeVar("R")
POLL_S = 0.05


class Cancelled(Exception):
    """Raised in a decoder thread by `reserve` once the reader is closed (an error downstream)."""


class _Budget:
    def __init__(self, budget_bytes: int):
        self.cap, self.used, self.turn = budget_bytes, 0, 0      # turn: the next ticket allowed to reserve
        self.held: dict[int, int] = {}
        self.waiting: int | None = None                           # the ticket blocked on bytes, if any
        self.closed = False
        self.cond = threading.Condition()

    def reserve(self, ticket: int, nbytes: int) -> None:
        with self.cond:
            while not self.closed and (self.turn != ticket or (self.used and self.used + nbytes > self.cap)):
                if self.turn == ticket:
                    self.waiting = ticket
                self.cond.wait()
            if self.closed:
                raise Cancelled
            self.waiting = None
            self.used += nbytes
            self.held[ticket] = nbytes
            self.turn += 1
            self.cond.notify_all()

    def release(self, ticket: int) -> None:
        with self.cond:
            self.used -= self.held.pop(ticket, 0)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class Ticket:
    """What a decoder gets with its item: reserve(nbytes) before allocating, release() when it kept nothing."""

    def __init__(self, budget: _Budget, index: int):
        self._budget, self.index, self._reserved = budget, index, False

    def reserve(self, nbytes: int) -> None:
        if not self._reserved:
            self._reserved = True
            self._budget.reserve(self.index, nbytes)

    def release(self) -> None:
        self._budget.release(self.index)


def _run(decode: Callable[[T, Ticket], R], item: T, ticket: Ticket) -> R:
    try:
        return decode(item, ticket)
    finally:
        ticket.reserve(0)        # a decoder that failed before reserving still passes its turn on


def batches(items: list[T], decode: Callable[[T, Ticket], R], batch: int, budget_bytes: int,
            workers: int = 4, ahead: int = 3) -> Iterator[list[R]]:
    """Lists of decode(item, ticket) in input order, at most `batch` long, with at most `ahead` x `batch` items
    submitted and `budget_bytes` reserved at once (see the module docstring)."""
    budget = _Budget(budget_bytes)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
    try:
        pending: deque = deque()
        queued = iter(enumerate(items))
        while True:
            while len(pending) < ahead * batch and (nxt := next(queued, None)) is not None:
                ticket = Ticket(budget, nxt[0])
                pending.append((ticket, pool.submit(_run, decode, nxt[1], ticket)))
            if not pending:
                return
            out, tickets = [], []
            while pending and len(out) < batch:
                ticket, fut = pending[0]
                while not fut.done() and not (out and budget.waiting == ticket.index):
                    wait([fut], timeout=POLL_S, return_when=FIRST_COMPLETED)
                if not fut.done():
                    break                                       # it waits for this batch's bytes: yield it now
                pending.popleft()
                out.append(fut.result())
                tickets.append(ticket)
            yield out
            for ticket in tickets:
                ticket.release()
    finally:
        budget.close()
        pool.shutdown(wait=True, cancel_futures=True)
