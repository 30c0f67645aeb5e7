"""``dataengine status`` against a real Orchestrator gRPC server on loopback: ``--json`` for
scripts (the review backlog's oldest age included), ``--watch`` frames until its count, and the
throughput the watch computes from successive settled counts."""

from __future__ import annotations

import io
import json

from rich.console import Console
from typer.testing import CliRunner

from services.app.cli import app
from services.orchestrator.model import Stats
from services.app.status_view import Throughput, settled_count, watch
from tests.orchestrator.test_servicer import engine, inline, png, run, server, stub, submit  # noqa: F401

runner = CliRunner()


def test_status_json_and_watch_show_the_engine(server, engine):
    stub, address = server
    submit(stub, inline(png(1)), inline(png(2)), labels=["dog"])
    run(engine)
    answer = runner.invoke(app, ["status", "--address", address, "--json"])
    assert answer.exit_code == 0, answer.output
    stats = json.loads(answer.output)
    assert sum(stats["items_by_state"].values()) == 2 and "review_oldest_s" in stats
    assert isinstance(stats["annotators"], list)
    waiting = sum(stats["review_waiting"].values())
    assert (stats["review_oldest_s"] > 0) == (waiting > 0)

    frames = runner.invoke(app, ["status", "--address", address, "--watch", "--count", "3", "--interval", "0.1"],
                           env={"COLUMNS": "200"})
    assert frames.exit_code == 0, frames.output
    assert frames.output.count("items by state") == 3  # piped: one frame after another
    assert frames.output.count(address) == 3 and "queues (ready + unacked)" in frames.output
    assert f"waiting for a human {waiting}" in frames.output

    both = runner.invoke(app, ["status", "--address", address, "--watch", "--json"])
    assert both.exit_code == 2 and "--watch and --json" in both.output


def test_on_a_terminal_the_frame_is_redrawn_in_place():
    fetched = []

    def fetch() -> Stats:
        fetched.append(1)
        return Stats({"accepted": len(fetched)}, {}, {"embedder": 0}, 0, {"review": 1}, 90.0)

    screen = io.StringIO()
    watch(fetch, "here:1", Console(file=screen, force_terminal=True, width=160, highlight=False), interval_s=0.05, count=3)
    assert len(fetched) == 3
    assert "\x1b[1A" in screen.getvalue() and "oldest 1.5 min" in screen.getvalue()  # cursor moves: one frame redrawn


def test_throughput_is_settled_items_per_minute_between_refreshes():
    now = [0.0]
    throughput = Throughput(clock=lambda: now[0])

    def stats(**by_state) -> Stats:
        return Stats(by_state, {}, {}, 0)

    throughput.update(stats(pending=5, accepted=1))
    assert throughput.now_per_min is None  # one point is no rate
    now[0] = 30.0
    throughput.update(stats(pending=2, accepted=2, review=1, rejected=1, failed=1))  # 4 more settled in 30 s
    assert throughput.now_per_min == 8.0 and throughput.mean_per_min == 8.0
    now[0] = 90.0
    throughput.update(stats(accepted=4, review=1, rejected=1, failed=1, discarded=0))  # 2 more in 60 s
    assert throughput.now_per_min == 2.0 and throughput.mean_per_min == 4.0
    assert settled_count(stats(pending=3, embedded=1, accepted=2, discarded=1)) == 3
