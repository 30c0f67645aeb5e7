"""Deterministic object keys: re-running a stage overwrites its output, never duplicates it."""

from __future__ import annotations

import hashlib
import re

from services.common.errors import InvalidInput

_SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


def _part(value: str, what: str) -> str:
    if not value or not _SAFE.match(value) or value in {".", ".."}:
        raise InvalidInput(f"{what} must be non-empty [A-Za-z0-9._-], got {value!r}")
    return value


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_key(image_id: str, suffix: str = "") -> str:
    """Where an ingested image's bytes live (content-addressed by its sha256)."""
    return f"images/{_part(image_id, 'image_id')}{suffix}"


def crop_tag(crop_box: tuple[int, int, int, int]) -> str:
    """``x0_y0_x1_y1`` of an XYXY crop box."""
    return "_".join(str(int(v)) for v in crop_box)


def embedding_key(model_id: str, image_id: str, crop_box: tuple[int, int, int, int]) -> str:
    """One embedding per model, image and crop box (the full image is the crop 0_0_W_H)."""
    return f"embeddings/{_part(model_id, 'model_id')}/{_part(image_id, 'image_id')}/{crop_tag(crop_box)}.npz"


def logits_key(model_id: str, image_id: str, prompt_digest: str) -> str:
    """Low-res logits of one interactive Predict, keyed by a digest of its prompts."""
    return (f"logits/{_part(model_id, 'model_id')}/{_part(image_id, 'image_id')}/"
            f"{_part(prompt_digest, 'prompt_digest')}.npy")


def masks_key(model_id: str, image_id: str, params_digest: str) -> str:
    """SA-1B JSON of one automatic generation, keyed by a digest of its parameters."""
    return (f"masks/{_part(model_id, 'model_id')}/{_part(image_id, 'image_id')}/"
            f"{_part(params_digest, 'params_digest')}.json")


def manifest_key(item_id: str) -> str:
    """An item's manifest: the source of truth of its state and results."""
    return f"items/{_part(item_id, 'item_id')}/manifest.json"


def step_key(item_id: str, step: str) -> str:
    """Where a pipeline step's output for an item lives (re-running the step overwrites it)."""
    return f"items/{_part(item_id, 'item_id')}/{_part(step, 'step')}.json"
