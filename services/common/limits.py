"""Bounds on what any caller may send, checked where it arrives (gRPC, tasks, the CLI, the studio),
each named in the error that refuses it."""

from __future__ import annotations

import unicodedata

from services.common.errors import InvalidInput

MAX_LABELS = 256  # known labels of one request
MAX_LABEL_CHARS = 200  # a noun phrase, not a document
MAX_ID_CHARS = 128  # item ids are 24 hex digits; an id is never echoed past this


def check_label(label: object, what: str) -> str:
    """``label`` if it is a noun phrase a caller may send: text, not blank, at most
    ``MAX_LABEL_CHARS`` characters, no control characters (NUL, ESC, newlines: they would survive
    into exports and terminals). ``InvalidInput`` naming ``what`` otherwise."""
    if not isinstance(label, str) or not label.strip():
        raise InvalidInput(f"{what} is empty or not text: {label!r:.80}")
    if len(label) > MAX_LABEL_CHARS:
        raise InvalidInput(f"{what} has {len(label)} characters ({label[:40]!r}...); at most {MAX_LABEL_CHARS}")
    if any(unicodedata.category(c) == "Cc" for c in label):
        raise InvalidInput(f"{what} {label[:80]!r} holds control characters (NUL, ESC, newline ...)")
    return label


def check_labels(labels: object) -> list[str]:
    """A list of at most ``MAX_LABELS`` labels, each as ``check_label``."""
    if isinstance(labels, (str, bytes)):
        raise InvalidInput("known_labels must be a list of phrases, not one string")
    labels = list(labels)  # type: ignore[call-overload]
    if len(labels) > MAX_LABELS:
        raise InvalidInput(f"{len(labels)} known labels; at most {MAX_LABELS}")
    return [check_label(label, f"known label {i}") for i, label in enumerate(labels)]
