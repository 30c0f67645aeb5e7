"""``dataengine mining``: where the machine fails, from the items' failure modes (active mining):
counts per failure mode and per phrase of the items waiting for a human, and how they changed
from the previous decoder to the last one on the items both routed (after ``models promote`` and
``rerun``). Tables on the terminal, or ``--json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from services.app.cli_common import fail, stdout
from services.common.errors import DataEngineError
from services.app.train_commands import RUN, open_run_store


def mining(
    run: Optional[Path] = RUN,
    as_json: bool = typer.Option(False, "--json", help="The report as JSON on stdout."),
    top: int = typer.Option(20, "--top", min=1, help="Phrases shown, most items first."),
) -> None:
    """Failure modes of the items waiting for a human, per mode and per phrase, and their change
    since the last model."""
    from services.orchestrator.exports import iter_items
    from services.orchestrator.mining import report

    try:
        result = report(iter_items(open_run_store(run)), top)
    except DataEngineError as exc:
        fail(str(exc), code=1)
    doc = result.to_json(top)
    if as_json:
        typer.echo(json.dumps(doc))
        return
    _show(doc)


def _show(doc: dict) -> None:
    waiting, change = doc["waiting"], doc["since_last_model"]
    title = f"failure modes of the {waiting['to_human']} items waiting for a human"
    table = Table(title=title)
    table.add_column("failure mode")
    table.add_column("waiting", justify="right")
    if change:
        table.caption = (f"on the {change['items']} items both routed: {change['previous_decoder']} sent "
                         f"{change['to_human']['before']} to a human, {change['decoder']} {change['to_human']['now']}")
        table.add_column(f"before ({change['previous_decoder']})", justify="right")
        table.add_column(f"now ({change['decoder']})", justify="right")
        table.add_column("change", justify="right")
    for mode, n in waiting["by_mode"].items():
        row = [mode, str(n)]
        if change:
            c = change["by_mode"][mode]
            row += [str(c["before"]), str(c["now"]), f"{c['change']:+d}" if c["change"] else "0"]
        table.add_row(*row)
    stdout.print(table)
    phrases = Table(title="phrases with failure modes in the waiting items, most items first")
    phrases.add_column("phrase")
    phrases.add_column("items", justify="right")
    phrases.add_column("failure modes")
    for phrase, row in waiting["by_phrase"].items():
        modes = ", ".join(f"{m} {n}" for m, n in sorted(row["modes"].items(), key=lambda kv: -kv[1]))
        phrases.add_row(phrase, str(row["items"]), modes)
    stdout.print(phrases)
    if not change:
        stdout.print("one decoder so far: the change since the last model shows after `dataengine models promote` "
                      "and `dataengine rerun`")


def register(app: typer.Typer) -> None:
    app.command("mining")(mining)
