"""``dataengine calibrate``: fit the heuristic verifier's calibration on human-reviewed items, save
it, and print how well calibrated the scores were before and are after (JSON).

Thin: it parses its arguments, calls ``services.verifier.calibration`` and prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from services.cli_common import fail, settings as make_settings
from services.common.errors import DataEngineError


def calibrate(
    out: Path = typer.Option(..., "--out", help="Calibration JSON to write; point DATAENGINE_VERIFIER_CALIBRATION "
                             "at it."),
    items: Optional[Path] = typer.Option(None, "--items", help="JSONL of training records: "
                                         "{FEATURE: number, ..., \"accepted\": true|false} per line."),
    store: Optional[bool] = typer.Option(None, "--store/--no-store", help="Read the human-reviewed items of the "
                                         "object store (DATAENGINE_STORE settings); default: unless --items."),
    labels: str = typer.Option("items", "--labels", help="From the store: 'items' (accepted or discarded) or "
                               "'masks' (each mask a human accepted or rejected in the studio: MV)."),
) -> None:
    """Fit P(a human accepts) from the heuristic verifier's features (logistic regression) on items
    whose review outcome is known; prints n, ECE (10 bins) and Brier score before and after."""
    from services.common.storage import open_store
    from services.verifier.calibration import (Examples, examples_from_jsonl, examples_from_mask_decisions,
                                               examples_from_store, fit)
    from services.verifier.heuristic import HeuristicVerifier

    settings = make_settings()
    if labels not in ("items", "masks"):
        fail(f"--labels must be 'items' or 'masks', got {labels!r}")
    use_store = store if store is not None else items is None
    if not use_store and items is None:
        fail("nothing to fit on: give --items, or leave out --no-store")
    try:
        parts = []
        if use_store:
            # Uncalibrated, and configured as the deployed verifier: the features must be the ones
            # it computes when it scores.
            read = examples_from_store if labels == "items" else examples_from_mask_decisions
            parts.append(read(open_store(settings), HeuristicVerifier()))
        if items is not None:
            parts.append(examples_from_jsonl(items))
        examples = Examples.concat(parts)
        calibration, report = fit(examples)
        calibration.save(out)
    except DataEngineError as exc:
        fail(str(exc), code=1)
    except OSError as exc:  # --out not writable
        fail(f"cannot write {out}: {exc}", code=1)
    typer.echo(json.dumps({**report, "sources": examples.sources, "skipped": examples.skipped, "out": str(out)}))


def register(app: typer.Typer) -> None:
    app.command()(calibrate)
