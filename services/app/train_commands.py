"""``dataengine train decoder`` and ``dataengine eval-masks``: the decoder learns from, and is
measured on, the masks people accepted in the studio.

It sits at the top, beside cli.py, because it joins the orchestrator's manifests (which items a
human accepted, their masks and embeddings) to the decoder's training core; both cores stay
unaware of each other. The examples: every mask of every positive phrase a human kept on an item
now ``accepted`` after a human review, with the item's stored full-image embedding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import typer

from services.app.cli_common import console, fail, settings as make_settings
from services.common.embedding import StoredEmbedding
from services.common.errors import DataEngineError, FailedPrecondition
from services.common.storage import LocalStore, ObjectStore, open_store

train_app = typer.Typer(help="Fine-tune models on the humans' work.", no_args_is_help=True)

RUN = typer.Option(None, "--run", help="A `dataengine run --out` folder (its local store); default: the object "
                   "store of DATAENGINE_STORE settings.")
HOLDOUT = typer.Option(0.2, "--holdout", help="Share of items (by item id) held out of training, for the figures.")


@dataclass
class Gathered:
    """The examples and why the rest were left out (reason -> count)."""

    examples: list = field(default_factory=list)
    items: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


def human_examples(store: ObjectStore) -> Gathered:
    """Every human-kept mask of the store's human-accepted items, with its embedding (read once per item)."""
    from services.decoder.prompting import Example
    from services.orchestrator.exports import iter_items
    from services.orchestrator.model import EMBED, ItemState

    out = Gathered()
    for item in iter_items(store, {ItemState.ACCEPTED}):
        phrases = [p for p in item.phrases if p.provenance.startswith("human:") and not p.is_negative and p.masks]
        if not item.reviewer or not phrases:
            continue
        if not item.outputs.get(EMBED):
            out.skip("no stored embedding")
            continue
        try:
            emb = StoredEmbedding.from_bytes(store.get(item.outputs[EMBED]), item.outputs[EMBED])
        except (KeyError, DataEngineError):  # NotFound is a KeyError
            out.skip("embedding unreadable or gone")
            continue
        out.items += 1
        for phrase in phrases:
            for record in phrase.masks:
                mask = record.decode()
                if mask.shape != tuple(emb.original_size):
                    out.skip("mask size differs from the embedding's")
                elif mask.sum() < 4:
                    out.skip("mask under 4 pixels")
                else:
                    out.examples.append(Example(item.item_id, emb, mask))
    return out


def measure(loaded, examples: list, name: str) -> dict:
    """``mask_eval.evaluate`` of ``loaded`` on ``examples`` (JSON figures); FailedPrecondition when
    their embeddings are of another encoder than the checkpoint reads."""
    from services.decoder.mask_eval import evaluate
    from services.decoder.prompting import prepare

    others = {e.embedding.model_id for e in examples} - {loaded.encoder_id}
    if others:
        raise FailedPrecondition(f"{name}: the store's embeddings are of encoder {', '.join(sorted(others))}, "
                                 f"not this checkpoint's {loaded.encoder_id}")
    return evaluate(loaded.model, [prepare(loaded.model, e, loaded.device) for e in examples]).to_json()


def open_run_store(run: Path | None) -> ObjectStore:
    """The store of a `dataengine run --out` folder, else the one the settings name."""
    if run is None:
        return open_store(make_settings())
    from services.app.embedded import STORE_DIR

    if not (run / STORE_DIR).is_dir():
        fail(f"{run} holds no engine store ({STORE_DIR}/): run dataengine run IMAGES --out {run}")
    return LocalStore(run / STORE_DIR)


def _load(model_type: str | None, checkpoint: Path | None, device: str | None):
    from services.common.sam_models import checkpoint_path, load_sam

    settings = make_settings(model_type=model_type, checkpoint=checkpoint, device=device)
    path = checkpoint_path(settings.model_type, settings.checkpoint, settings.models_dir)
    return load_sam(settings.model_type, path, settings.device), path


@train_app.command("decoder")
def train_decoder(
    out: Path = typer.Option(..., "--out", help="Folder for the checkpoint, its model card and the resumable state."),
    run: Optional[Path] = RUN,
    model_type: Optional[str] = typer.Option(None, "--model-type", help="The base: vit_h, vit_l, vit_b or tiny."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="The base checkpoint (that embedded the store)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N."),
    epochs: int = typer.Option(5, "--epochs"),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate."),
    rounds: int = typer.Option(2, "--rounds", help="Correction-click rounds after the first prompt."),
    batch_size: int = typer.Option(4, "--batch-size", help="Masks per optimizer step."),
    holdout: float = HOLDOUT,
    prompt_encoder: bool = typer.Option(False, "--prompt-encoder/--no-prompt-encoder", help="Train the prompt encoder too."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Fine-tune SAM's mask decoder on the human-accepted masks (image encoder frozen, stored
    embeddings); resumes in OUT where it stopped. Prints the model card."""
    from services.app.cli_common import progress
    from services.decoder.finetune import TrainConfig
    from services.decoder.training import train_decoder as train

    try:
        config = TrainConfig(epochs=epochs, lr=lr, rounds=rounds, batch_size=batch_size, holdout_fraction=holdout,
                             train_prompt_encoder=prompt_encoder, seed=seed)
    except ValueError as exc:
        fail(str(exc))
    store = open_run_store(run)
    try:
        gathered = human_examples(store)
        loaded, base = _load(model_type, checkpoint, device)
    except DataEngineError as exc:
        fail(str(exc), code=1)
    try:
        with progress() as bar:
            task = bar.add_task("train", total=None)

            def show(epoch: int, done: int, total: int, loss: float) -> None:
                bar.update(task, description=f"epoch {epoch + 1}/{epochs} loss {loss:.4f}", completed=done,
                           total=total)

            card = train(loaded, base, gathered.examples, config, out, show)
    except DataEngineError as exc:
        fail(f"{exc}{_skipped(gathered)}", code=1)
    typer.echo(json.dumps({k: v for k, v in card.to_json().items() if k not in ("trained_items", "held_out_items")}
                          | {"trained_items": len(card.trained_items), "held_out_items": len(card.held_out_items)},
                          indent=1))


def _skipped(gathered: Gathered) -> str:
    if not gathered.skipped:
        return ""
    return " (left out: " + ", ".join(f"{n} {why}" for why, n in sorted(gathered.skipped.items())) + ")"


def eval_masks(
    checkpoints: list[Path] = typer.Option(..., "--checkpoint", help="A checkpoint to measure; repeat to compare."),
    run: Optional[Path] = RUN,
    model_type: Optional[str] = typer.Option(None, "--model-type", help="vit_h, vit_l, vit_b or tiny."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N."),
    holdout: float = HOLDOUT,
    all_items: bool = typer.Option(False, "--all-items", help="Every human mask, not only the held-out split."),
) -> None:
    """mIoU and boundary IoU of one click, three clicks and a box against the human masks of the
    held-out items, per checkpoint; JSON on stdout."""
    from services.common.splits import held_out

    if not 0.0 < holdout < 1.0:
        fail(f"--holdout must be in (0, 1), got {holdout}")
    store = open_run_store(run)
    results = {}
    try:
        gathered = human_examples(store)
        examples = [e for e in gathered.examples if all_items or held_out(e.item_id, holdout)]
        if not examples:
            raise FailedPrecondition(f"no human-accepted masks to measure on ({len(gathered.examples)} in the store, "
                                     f"none held out at --holdout {holdout}){_skipped(gathered)}")
        for path in checkpoints:
            loaded, _ = _load(model_type, path, device)
            results[str(path)] = measure(loaded, examples, str(path))
            console.print(f"{path}: one click mIoU {results[str(path)]['one_click']['miou']:.4f}")
    except DataEngineError as exc:
        fail(str(exc), code=1)
    typer.echo(json.dumps({"items": len({e.item_id for e in examples}), "checkpoints": results}, indent=1))


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")
    app.command("eval-masks")(eval_masks)
