"""Bounds on what any caller may send, checked where it arrives (gRPC, tasks, the CLI, the studio),
each named with its setting in the error that refuses it. The sizes of images and messages are
settings too (``max_image_pixels``, ``max_message_bytes``), checked by the image reader and gRPC."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from services.common.errors import InvalidInput


@dataclass(frozen=True)
class Limits:
    """max_labels: known labels of one request. max_label_chars: a noun phrase, not a document.
    max_id_chars: item ids are 24 hex digits; an id is never echoed past this (a huge one would not
    fit a gRPC trailer)."""

    max_labels: int = 256
    max_label_chars: int = 200
    max_id_chars: int = 128

    @classmethod
    def from_settings(cls, settings) -> "Limits":
        return cls(settings.max_labels, settings.max_label_chars, settings.max_id_chars)

    def check_label(self, label: object, what: str) -> str:
        """``label`` if it is a noun phrase a caller may send: text, not blank, at most
        ``max_label_chars`` characters, no control characters (NUL, ESC, newlines: they would
        survive into exports and terminals). ``InvalidInput`` naming ``what`` otherwise."""
        if not isinstance(label, str) or not label.strip():
            raise InvalidInput(f"{what} is empty or not text: {label!r:.80}")
        if len(label) > self.max_label_chars:
            raise InvalidInput(f"{what} has {len(label)} characters ({label[:40]!r}...); at most "
                               f"{self.max_label_chars} (DATAENGINE_MAX_LABEL_CHARS)")
        if any(unicodedata.category(c) == "Cc" for c in label):
            raise InvalidInput(f"{what} {label[:80]!r} holds control characters (NUL, ESC, newline ...)")
        return label

    def check_labels(self, labels: object) -> list[str]:
        """A list of at most ``max_labels`` labels, each as ``check_label``."""
        if isinstance(labels, (str, bytes)):
            raise InvalidInput("known_labels must be a list of phrases, not one string")
        labels = list(labels)  # type: ignore[call-overload]
        if len(labels) > self.max_labels:
            raise InvalidInput(f"{len(labels)} known labels; at most {self.max_labels} (DATAENGINE_MAX_LABELS)")
        return [self.check_label(label, f"known label {i}") for i, label in enumerate(labels)]

    def check_id(self, value: str, what: str) -> str:
        """``value`` if it is at most ``max_id_chars`` long; the error gives its length only."""
        if len(value) > self.max_id_chars:
            raise InvalidInput(f"bad {what}: {len(value)} characters, at most {self.max_id_chars} "
                               "(DATAENGINE_MAX_ID_CHARS)")
        return value
