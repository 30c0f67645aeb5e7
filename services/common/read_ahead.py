"""Ordered concurrent map with a bounded window: reads that wait on storage, overlapped."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T, R = TypeVar("T"), TypeVar("R")


def read_ahead(inputs: Iterable[T], fn: Callable[[T], R], window: int) -> Iterator[R]:
    """``fn(x)`` for each input, in input order, with up to ``window`` calls running on threads.

    Inputs are pulled only as results are taken, so memory holds ``window`` results however long
    ``inputs`` is. An exception of ``fn`` is raised where its result would have been; calls not yet
    started are then cancelled. ``window`` 1 or less: plain ``map``, no threads.
    """
    if window <= 1:
        yield from map(fn, inputs)
        return
    pending: deque = deque()
    with ThreadPoolExecutor(window, thread_name_prefix="read-ahead") as pool:
        try:
            for x in inputs:
                pending.append(pool.submit(fn, x))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # an error, or the consumer stopped early: start nothing more
            for future in pending:
                future.cancel()
