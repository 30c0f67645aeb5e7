"""``dataengine models promote`` and ``dataengine rerun``: a better decoder goes into service, and
the items still waiting for a human are decoded and verified again with it.

At the top, beside cli.py: promotion measures checkpoints (the decoder's evaluation) on the human
masks of the orchestrator's manifests and writes the pointer every service reads
(``services.common.promotion``); rerun drives the orchestrator's core, embedded or distributed.

Promotion rule: the candidate must read the same encoder as the decoder in service (else the
stored embeddings would not match: refused, ``--force`` or not), and its held-out one-click mIoU
must be strictly higher than the current decoder's, both measured now on the same masks: the
store's human-accepted masks of items held out at the candidate's training split (its model card's
``--holdout``) and not among its trained items. ``--force`` promotes anyway and says why in the
pointer, the history and the promoted copy's model card (``forced``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from services.app.cli_common import console, fail, settings as make_settings
from services.common.errors import DataEngineError, FailedPrecondition
from services.app.train_commands import RUN, human_examples, measure, open_run_store

RESTART = ("restart the services that load SAM (decoder, embedder, studio: `kubectl rollout restart "
           "deployment/decoder deployment/embedder deployment/studio`, or `docker compose restart`)")


def _held_out_examples(store, card, encoder_id: str):
    from services.common.splits import held_out

    fraction = float((card.hyperparameters if card else {}).get("holdout_fraction", 0.2))
    trained = set(card.trained_items) if card else set()
    gathered = human_examples(store)
    return [e for e in gathered.examples if held_out(e.item_id, fraction) and e.item_id not in trained
            and e.embedding.model_id == encoder_id]


def promote(
    checkpoint: Path = typer.Argument(..., help="The checkpoint to put into service (from `dataengine train decoder`)."),
    run: Optional[Path] = RUN,
    force: bool = typer.Option(False, "--force", help="Promote even when it does not beat the current decoder "
                               "(recorded); never across encoders."),
    reason: str = typer.Option("", "--reason", help="Why, with --force (recorded)."),
    model_type: Optional[str] = typer.Option(None, "--model-type", help="vit_h, vit_l, vit_b or tiny."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (for the measurement)."),
) -> None:
    """Make CHECKPOINT the decoder the services load (DATAENGINE_MODELS_DIR/promoted_<type>.json),
    refused unless its held-out figures beat the current decoder's. JSON on stdout."""
    from services.common.model_card import read_card
    from services.common.promotion import METRIC, Promotion, beats, install
    from services.common.sam_models import file_sha256, load_from_settings, load_sam

    settings = make_settings(model_type=model_type, device=device)
    if settings.checkpoint is not None:
        console.print(f"[yellow]DATAENGINE_CHECKPOINT is set ({settings.checkpoint}): services configured so load "
                      "that file, not the promoted one; unset it there[/yellow]")
    try:
        # The candidate first: a file that is no checkpoint of this type is refused before anything.
        candidate = load_sam(settings.model_type, checkpoint, settings.device)
        card = read_card(checkpoint)
        card = card if card and card.checkpoint_sha256 == file_sha256(checkpoint) else None
        try:
            current = load_from_settings(settings)
        except FailedPrecondition as exc:
            if not force:
                raise FailedPrecondition(f"the decoder in service cannot be loaded, so nothing to compare with: {exc}; "
                                         "--force promotes without a comparison") from None
            current = None
        if current is not None and current.decoder_id == candidate.decoder_id:
            typer.echo(json.dumps({"promoted": False, "why": f"{checkpoint} is the decoder in service already",
                                   "decoder_id": candidate.decoder_id}))
            return
        if current is not None and candidate.encoder_id != current.encoder_id:
            raise FailedPrecondition(
                f"{checkpoint} reads encoder {candidate.encoder_id} but the services' embeddings are of encoder "
                f"{current.encoder_id}: its masks would come from embeddings it was not trained on; fine-tune from "
                "the checkpoint in service")
        store = open_run_store(run)
        examples = _held_out_examples(store, card, candidate.encoder_id)
        figures = measure(candidate, examples, str(checkpoint)) if examples else {}
        previous = measure(current, examples, "the decoder in service") if examples and current else {}
        mode, name = METRIC
        forced = ""
        if not examples:
            verdict = "no held-out human masks to measure on"
        elif not previous:
            verdict = "no decoder in service to compare with"
        else:
            verdict = (f"held-out {mode} {name} {figures[mode][name]:.4f} vs {previous[mode][name]:.4f} in service "
                       f"({figures['masks']} masks)")
        if not (figures and previous and beats(figures, previous)):
            if not force:
                raise FailedPrecondition(f"not promoted: {verdict} (--force to promote anyway, recorded)")
            forced = f"--force: {verdict}" + (f"; {reason}" if reason else "")
        sha = file_sha256(checkpoint)
        promotion = Promotion(
            model_type=settings.model_type, checkpoint=f"sam_{settings.model_type}_{candidate.decoder_id}.pth",
            sha256=sha, decoder_id=candidate.decoder_id, encoder_id=candidate.encoder_id, figures=figures,
            previous_decoder_id=current.decoder_id if current else "", previous_figures=previous,
            held_out_items=len({e.item_id for e in examples}), forced=forced)
        pointer = install(promotion, checkpoint, card, settings.models_dir)
    except DataEngineError as exc:
        fail(str(exc), code=1)
    except OSError as exc:
        fail(f"cannot write to {settings.models_dir}: {exc}", code=1)
    console.print(f"promoted {promotion.decoder_id}: {verdict}{' [yellow](forced)[/yellow]' if forced else ''}; "
                  f"now {RESTART}, then `dataengine rerun --state review --state rejected`")
    typer.echo(json.dumps({"promoted": True, "pointer": str(pointer), **promotion.to_json()}))


def rerun(
    states: list[str] = typer.Option(..., "--state", help="review and/or rejected (repeat): the items to redo."),
    run: Optional[Path] = typer.Option(None, "--run", help="A `dataengine run --out` folder: redo its items here, "
                                       "with the decoder the settings load, and refresh its exports. Default: the "
                                       "deployment (Redis, object store), its decoder workers redo them."),
    model_type: Optional[str] = typer.Option(None, "--model-type", help="With --run: vit_h, vit_l, vit_b or tiny."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="With --run: this checkpoint, not the "
                                              "promoted one."),
    device: Optional[str] = typer.Option(None, "--device", help="With --run: cpu, cuda, cuda:N."),
    amg_params: Optional[str] = typer.Option(None, "--amg-params", help="With --run: grid-mask parameters (JSON) for "
                                             "items of older versions, which did not record the ones they ran with."),
) -> None:
    """Decode and verify again the items waiting in review or the fix queue that no human settled
    or holds, with the decoder in service; they are routed anew. JSON summary on stdout."""
    from services.app.engine_commands import parse_amg
    from services.orchestrator.model import ItemState

    try:
        chosen = [ItemState.parse(s) for s in states]
    except DataEngineError as exc:
        fail(str(exc))
    settings = make_settings(model_type=model_type, checkpoint=checkpoint, device=device,
                             amg_params=parse_amg(amg_params))
    try:
        if run is not None:
            summary, counts = _rerun_here(settings, run, chosen)
        else:
            summary, counts = _rerun_deployed(settings, chosen), {}
    except DataEngineError as exc:
        fail(str(exc), code=1)
    for why, n in sorted(summary.skipped.items()):
        console.print(f"left {n}: {why}")
    typer.echo(json.dumps(summary.to_json() | ({"by_state": counts} if run is not None else {})))


def _rerun_here(settings, run: Path, states):
    from services.app.embedded import EmbeddedEngine, refresh_outputs

    engine = EmbeddedEngine(settings, run)
    summary = engine.rerun(states)
    _, counts = refresh_outputs(run)
    console.print(f"redid {len(summary.rerun)} items with decoder {engine.sam.decoder_id}; exports refreshed")
    return summary, counts


def _rerun_deployed(settings, states):
    from services.common.promotion import read_promoted
    from services.app.serve import SERVICES

    promoted = None if settings.checkpoint is not None else read_promoted(settings.models_dir, settings.model_type)
    decoder_id = promoted[0].decoder_id if promoted else ""
    orchestrator = SERVICES["orchestrator"]().make_core(settings)
    summary = orchestrator.rerun(states, decoder_id)
    console.print(f"sent {len(summary.rerun)} items to the decode queue"
                  + (f" for decoder {decoder_id}: the decoder workers must run it ({RESTART})" if decoder_id else ""))
    return summary


def register(app: typer.Typer, models_app: typer.Typer) -> None:
    models_app.command("promote")(promote)
    app.command("rerun")(rerun)
