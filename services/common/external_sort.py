"""Sorting more names than should sit in memory: sorted runs spilled to temporary files, merged.

A local-directory store keeps one folder per item under ``items/``; listing it in key order would
hold every name (~80 bytes each: 80 MB at 10^6 items). ``sorted_names`` holds at most ``run``
names: beyond that it writes sorted runs of ``run`` names to temporary files and merges them
lazily (``heapq.merge``), one line per run in memory.
"""

from __future__ import annotations

import heapq
import tempfile
from typing import IO, Iterable, Iterator

RUN = 50_000  # names per in-memory run (~4 MB)


def sorted_names(names: Iterable[str], run: int = RUN) -> Iterator[str]:
    """``names`` in sorted order, memory bounded by ``run`` names. Names may not contain a line
    break (object keys never do: ``check_key`` refuses control characters); such names are dropped."""
    chunk: list[str] = []
    spilled: list[IO[str]] = []
    try:
        for name in names:
            if "\n" in name:
                continue
            chunk.append(name)
            if len(chunk) >= run:
                spilled.append(_spill(chunk))
                chunk = []
        chunk.sort()
        if not spilled:
            yield from chunk
            return
        if chunk:
            spilled.append(_spill(chunk))
        del chunk
        yield from heapq.merge(*((line[:-1] for line in f) for f in spilled))
    finally:
        for f in spilled:
            f.close()


def _spill(chunk: list[str]) -> IO[str]:
    chunk.sort()
    f = tempfile.TemporaryFile("w+", encoding="utf-8", errors="surrogateescape")
    f.writelines(name + "\n" for name in chunk)
    f.seek(0)
    return f
