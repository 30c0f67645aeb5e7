"""``dataengine calibrate``: fit the heuristic verifier's calibration on human decisions (item
outcomes, per-mask MV and per-phrase EV decisions), save it, and print how well calibrated the
scores were before and are after, on held-out items and on the training split (JSON).

Thin: it parses its arguments, calls ``services.verifier.calibration`` and prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from services.app.cli_common import fail, settings as make_settings
from services.common.errors import DataEngineError

# --labels name -> the model its decisions train
LABELS = {"items": "item", "masks": "mask", "phrases": "exhaustivity"}


def _labels(text: Optional[str]) -> list[str]:
    """The --labels list, in LABELS order; all of them when not given."""
    if text is None:
        return list(LABELS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LABELS]
    if unknown or not names:
        fail(f"--labels must be a comma list of {', '.join(LABELS)}, got {text!r}")
    return [n for n in LABELS if n in names]


def calibrate(
    out: Path = typer.Option(..., "--out", help="Calibration JSON to write; point DATAENGINE_VERIFIER_CALIBRATION "
                             "at it."),
    items: Optional[Path] = typer.Option(None, "--items", help="JSONL of training records for the item model: "
                                         "{FEATURE: number, ..., \"accepted\": true|false} per line."),
    store: Optional[bool] = typer.Option(None, "--store/--no-store", help="Read the human decisions of the "
                                         "object store (DATAENGINE_STORE settings); default: unless --items."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Which of the store's decisions to learn from, "
                                         "a comma list: 'items' (accepted or discarded), 'masks' (each mask a "
                                         "human accepted or rejected in the studio: MV), 'phrases' (each "
                                         "label's exhaustivity decision: EV). Default: all three, each model "
                                         "fit where there is enough data; listed ones must fit."),
    holdout: float = typer.Option(0.2, "--holdout", help="Share of items (by sha256 of the item id) held out "
                                  "to measure the fit; 0: no held-out figures."),
) -> None:
    """Fit P(a human accepts) from the heuristic verifier's features (logistic regression, one
    model per check) on the training split; prints n, ECE (10 bins) and Brier score before and
    after on the held-out split and the training split. The saved models are refit on all data."""
    from services.common.storage import open_store
    from services.verifier.calibration import Examples, fit_all
    from services.app.calibration_data import (examples_from_jsonl, examples_from_mask_decisions,
                                                    examples_from_phrase_decisions, examples_from_store)
    from services.verifier.heuristic import HeuristicVerifier

    settings = make_settings()
    chosen = _labels(labels)
    if not 0.0 <= holdout < 1.0:
        fail(f"--holdout must be in [0, 1), got {holdout}")
    use_store = store if store is not None else items is None
    if not use_store and items is None:
        fail("nothing to fit on: give --items, or leave out --no-store")
    required = {LABELS[n] for n in chosen} if labels is not None else set()
    readers = {"items": examples_from_store, "masks": examples_from_mask_decisions,
               "phrases": examples_from_phrase_decisions}
    try:
        parts: dict[str, list[Examples]] = {}
        if use_store:
            object_store = open_store(settings)
            # Uncalibrated, and configured as the deployed verifier: the features must be the ones
            # it computes when it scores.
            verifier = HeuristicVerifier()
            for name in chosen:
                parts.setdefault(LABELS[name], []).append(readers[name](object_store, verifier))
        if items is not None:
            parts.setdefault("item", []).append(examples_from_jsonl(items))
            required.add("item")
        examples = {check: Examples.concat(p) for check, p in parts.items()}
        calibration, report = fit_all(examples, holdout, sorted(required))
        calibration.save(out)
    except DataEngineError as exc:
        fail(str(exc), code=1)
    except OSError as exc:  # --out not writable
        fail(f"cannot write {out}: {exc}", code=1)
    read = [part for p in parts.values() for part in p]
    sources = {source: n for part in read for source, n in part.sources.items()}
    skipped = {source: part.skipped for part in read for source in part.sources}  # per reader: each reads all
    typer.echo(json.dumps({**report, "sources": sources, "skipped": skipped, "out": str(out)}))


def register(app: typer.Typer) -> None:
    app.command()(calibrate)
