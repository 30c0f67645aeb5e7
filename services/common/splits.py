"""Deterministic train / held-out splits by item id, shared by every model the engine fits on
human work (the decoder's fine-tuning, the verifier's calibration): all examples of one item land
on the same side, so a held-out figure is measured on images the fit never saw."""

from __future__ import annotations

import hashlib


def held_out(item_id: str, fraction: float) -> bool:
    """Whether ``item_id`` belongs to the held-out split: the first 8 bytes of its SHA-256 as a
    number in [0, 1) below ``fraction``. The same for every run, machine and store order."""
    value = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") / 2 ** 64
    return value < fraction
