"""``dataengine status --watch``: a live terminal view of a deployment (rich), refreshed from the
orchestrator's ``Stats`` RPC until Ctrl-C.

Throughput is what the settled counts say between two refreshes: items settled per minute now
(since the last refresh) and on average since the view started. The orchestrator's
``dataengine_items_settled_total`` gives the same figure to Prometheus (``rate() * 60``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from rich.columns import Columns
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from services.orchestrator.model import SETTLED, Stats

SETTLED_NAMES = tuple(sorted(s.name.lower() for s in SETTLED))


def settled_count(stats: Stats) -> int:
    return sum(stats.by_state.get(name, 0) for name in SETTLED_NAMES)


@dataclass
class Throughput:
    """Items settled per minute, from successive ``Stats``; ``clock``: monotonic seconds."""

    clock: Callable[[], float] = time.monotonic
    _first: tuple[float, int] | None = None
    _last: tuple[float, int] | None = None
    now_per_min: float | None = field(default=None, init=False)
    mean_per_min: float | None = field(default=None, init=False)

    def update(self, stats: Stats) -> None:
        point = (self.clock(), settled_count(stats))
        if self._first is None:
            self._first = point
        elif self._last is not None and point[0] > self._last[0]:
            self.now_per_min = 60.0 * (point[1] - self._last[1]) / (point[0] - self._last[0])
            self.mean_per_min = 60.0 * (point[1] - self._first[1]) / (point[0] - self._first[0])
        self._last = point


def _age(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}/min"


def _counts(title: str, counts: dict[str, int]) -> Table:
    table = Table(title=title, min_width=28)
    table.add_column("")
    table.add_column("count", justify="right")
    for key, count in sorted(counts.items()):
        table.add_row(key, str(count))
    return table


def render(stats: Stats, throughput: Throughput, where: str, at: str) -> Group:
    """One frame: the summary line, then items by state and stage, queues and the review backlog
    (side by side where the terminal is wide enough)."""
    dead = f"[red]dead letters {stats.dead_letters}[/red]" if stats.dead_letters else "dead letters 0"
    head = (f"[bold]{where}[/bold] at {at} · settled {_rate(throughput.now_per_min)} (mean "
            f"{_rate(throughput.mean_per_min)}) · waiting for a human {sum(stats.review_waiting.values())}, "
            f"oldest {_age(stats.review_oldest_s)} · {dead}")
    return Group(head, Columns([_counts("items by state", stats.by_state),
                                _counts("items by stage", stats.by_stage),
                                _counts("queues (ready + unacked)", stats.queue_depths),
                                _counts("review backlog", stats.review_waiting)]))


def watch(fetch: Callable[[], Stats], where: str, console: Console, interval_s: float = 2.0,
          count: int = 0) -> None:
    """Refresh every ``interval_s`` until Ctrl-C (or ``count`` frames; 0: no limit). On a terminal
    the frame is redrawn in place; piped, each frame is printed after the last (a log of them)."""
    throughput = Throughput()
    frames = 0

    def frame() -> Group:
        stats = fetch()
        throughput.update(stats)
        return render(stats, throughput, where, time.strftime("%H:%M:%S"))

    try:
        if console.is_terminal:
            with Live(frame(), console=console, auto_refresh=False) as live:
                frames = 1
                while not count or frames < count:
                    time.sleep(interval_s)
                    live.update(frame(), refresh=True)
                    frames += 1
        else:
            while not count or frames < count:
                if frames:
                    time.sleep(interval_s)
                console.print(frame())
                frames += 1
    except KeyboardInterrupt:
        pass
