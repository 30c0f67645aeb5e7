"""The promoted decoder: which checkpoint the services load when none is configured by path.

``dataengine models promote CHECKPOINT`` copies a fine-tuned checkpoint and its model card into
the models folder (``DATAENGINE_MODELS_DIR``, a volume every GPU pod mounts) under its decoder id,
then replaces the pointer ``promoted_<model type>.json`` beside them in one ``os.replace``: a
service starting at any moment reads either the old pointer or the new one, and the file a pointer
names is complete before the pointer exists. Every history line goes to ``promotions.jsonl``.

Without a pointer (or when ``DATAENGINE_CHECKPOINT`` names a file) nothing changes: the services
load the configured or the official checkpoint, as before promotion existed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.common.errors import FailedPrecondition
from services.common.model_card import ModelCard

KIND = "dataengine.promoted_decoder"
VERSION = 1
HISTORY = "promotions.jsonl"
METRIC = ("one_click", "miou")  # the figure a candidate must beat: held-out one-click mIoU


def pointer_path(models_dir: Path, model_type: str) -> Path:
    return Path(models_dir).expanduser() / f"promoted_{model_type}.json"


@dataclass
class Promotion:
    """One promotion: the checkpoint file (in the models folder), its SHA-256 and ids, the
    held-out figures of it and of the decoder it replaced (``mask_eval.Scores.to_json``, empty
    when nothing was measured), and ``forced``: why it was promoted without beating the current
    one ("" when it beat it)."""

    model_type: str
    checkpoint: str
    sha256: str
    decoder_id: str
    encoder_id: str
    figures: dict = field(default_factory=dict)
    previous_decoder_id: str = ""
    previous_figures: dict = field(default_factory=dict)
    held_out_items: int = 0
    forced: str = ""
    promoted_at: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return {"kind": KIND, "version": VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict, where: str) -> "Promotion":
        if not isinstance(d, dict) or d.get("kind") != KIND:
            raise FailedPrecondition(f"{where} is not a promoted-decoder pointer (kind {KIND!r})")
        if d.get("version") != VERSION:
            raise FailedPrecondition(f"{where} has version {d.get('version')!r}; this engine reads {VERSION}")
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except TypeError as exc:
            raise FailedPrecondition(f"{where} is malformed: {exc}") from None


def read_promoted(models_dir: Path, model_type: str) -> tuple[Promotion, Path] | None:
    """The promotion in force for ``model_type`` and the checkpoint path it names; None without one."""
    path = pointer_path(models_dir, model_type)
    if not path.is_file():
        return None
    try:
        promotion = Promotion.from_json(json.loads(path.read_text()), str(path))
    except ValueError as exc:
        raise FailedPrecondition(f"{path} is not JSON: {exc}") from None
    checkpoint = path.parent / promotion.checkpoint
    if not checkpoint.is_file():
        raise FailedPrecondition(f"{path} names {checkpoint}, which is gone; promote a checkpoint again or "
                                 f"remove {path.name} to go back to the official one")
    return promotion, checkpoint


def beats(candidate: dict, current: dict) -> bool:
    """Whether the candidate's held-out figure (``METRIC``) is strictly higher than the current's."""
    mode, name = METRIC
    return float(candidate[mode][name]) > float(current[mode][name])


def _atomic_copy(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def install(promotion: Promotion, checkpoint: Path, card: ModelCard | None, models_dir: Path) -> Path:
    """Copy ``checkpoint`` into ``models_dir`` as ``promotion.checkpoint`` with ``card`` beside it
    (its ``forced`` set from the promotion's), then point the services at it; returns the
    pointer's path. The copy's SHA-256 is checked before the pointer moves (a short copy must
    never be what the services load)."""
    from services.common.sam_models import file_sha256

    folder = Path(models_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / promotion.checkpoint
    if dest.resolve() != Path(checkpoint).resolve():
        _atomic_copy(Path(checkpoint), dest)
    if file_sha256(dest) != promotion.sha256:
        raise FailedPrecondition(f"the copy {dest} does not match {checkpoint} (SHA-256 differs): nothing promoted")
    if card is not None:
        card.forced = promotion.forced
        card.write(dest.with_suffix(".json"))
    pointer = pointer_path(folder, promotion.model_type)
    tmp = pointer.with_name(f".{pointer.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(promotion.to_json(), indent=1))
    os.replace(tmp, pointer)
    with open(folder / HISTORY, "a") as history:
        history.write(json.dumps(promotion.to_json()) + "\n")
    return pointer
