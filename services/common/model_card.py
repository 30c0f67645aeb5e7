"""A fine-tuned checkpoint's model card: what it is, what it was trained on, how it measured.

JSON beside the checkpoint, with the same stem (``sam_vit_b_ft.pth`` -> ``sam_vit_b_ft.json``).
The loader reads it for one thing: the encoder id, so a fine-tuned decoder on the base's frozen
encoder keeps using the embeddings the base stored. A card is believed only when its
``checkpoint_sha256`` is the file's (a card copied beside another checkpoint is ignored).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.common.errors import FailedPrecondition


@dataclass
class ModelCard:
    """What a fine-tuned checkpoint is and how it was made (see the module docstring)."""

    model_type: str
    checkpoint: str
    checkpoint_sha256: str
    decoder_id: str
    encoder_id: str
    base_checkpoint: str
    base_sha256: str
    trained_items: list[str]
    held_out_items: list[str]
    trained_masks: int
    held_out_masks: int
    hyperparameters: dict
    epoch_losses: list[dict]
    before: dict
    after: dict
    device: str
    created_at: float = field(default_factory=time.time)
    forced: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ModelCard":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def write(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)


def card_path(checkpoint: Path) -> Path:
    return Path(checkpoint).with_suffix(".json")


def read_card(checkpoint: Path) -> ModelCard | None:
    """The model card beside ``checkpoint``, None for a checkpoint without one (an official file)."""
    path = card_path(checkpoint)
    if not path.is_file():
        return None
    try:
        return ModelCard.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as exc:
        raise FailedPrecondition(f"{path} is not a model card: {exc}") from None
