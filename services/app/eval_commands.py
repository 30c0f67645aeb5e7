"""``dataengine eval``: the SA-Co benchmark metrics of predictions against SA-Co/Gold ground truth;
``dataengine eval-routing``: the routing's precision and recall against human decisions. Both
print JSON on stdout.

Thin: each parses its arguments, calls ``services.verifier.evaluation`` or ``routing_eval`` and
prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from services.app.cli_common import fail, settings as make_settings
from services.common.errors import DataEngineError


def evaluate(
    gt: list[Path] = typer.Option(..., "--gt", help="SA-Co/Gold ground-truth JSON; repeat for several annotators "
                                  "(each pair is scored against the most favourable one)."),
    pred: Path = typer.Option(..., "--pred", help="Predictions in the COCO results format: a JSON list of "
                              "{image_id (the pair id), segmentation (RLE), score, category_id}."),
    more_gt: Optional[list[Path]] = typer.Argument(None, hidden=True, metavar="[GT.json ...]"),
) -> None:
    """SA-Co metrics as the official SAM 3 evaluator computes them: cgF1, IL_MCC, positive_micro_F1,
    precision, recall, F1 (mean over IoU 0.50:0.95, and @0.5, @0.75), over the exhaustively
    annotated pairs; predictions scoring below 0.5 are dropped.

    Several annotators: --gt a.json b.json c.json, or --gt a.json --gt b.json --gt c.json."""
    from services.verifier.evaluation import evaluate as run

    try:
        # Click options take one value each: the files after the first --gt arrive as arguments.
        result = run([*gt, *(more_gt or [])], pred)
    except DataEngineError as exc:
        fail(str(exc), code=1)
    typer.echo(json.dumps(result, indent=1))


def evaluate_routing(
    items: Optional[Path] = typer.Option(None, "--items", help="JSONL, one routed unit per line: {\"score\": S or \"routed\": "
                               "accepted|review|rejected, \"human\": accept|reject or \"accepted\": true|false}."),
    store: Optional[bool] = typer.Option(None, "--store/--no-store", help="Read the items humans reviewed "
                                         "after the verifier scored them from the object store "
                                         "(DATAENGINE_STORE settings); default: unless --items."),
    accept_threshold: Optional[float] = typer.Option(None, "--accept-threshold",
                                                     help="Scores >= this are accepted (default: settings)."),
    review_threshold: Optional[float] = typer.Option(None, "--review-threshold",
                                                     help="Scores >= this and below accept are reviewed, lower ones "
                                                     "rejected (default: settings)."),
) -> None:
    """Precision and recall of auto-accept and auto-reject against human decisions, the share sent
    to review, and the routed-state x human-decision counts."""
    from services.orchestrator.routing import Thresholds
    from services.app.routing_eval import evaluate_routing as run

    from services.common.storage import open_store

    settings = make_settings(accept_threshold=accept_threshold, review_threshold=review_threshold)
    use_store = store if store is not None else items is None
    if not use_store and items is None:
        fail("nothing to evaluate: give --items, or leave out --no-store")
    try:
        result = run(Thresholds(settings.accept_threshold, settings.review_threshold), items,
                     open_store(settings) if use_store else None)
    except DataEngineError as exc:
        fail(str(exc), code=1)
    typer.echo(json.dumps(result, indent=1))


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
    app.command("eval-routing")(evaluate_routing)
