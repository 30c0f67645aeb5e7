"""Reading JSONL inputs (one JSON object per line) with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from services.common.errors import InvalidInput


def read_objects(path: Path | str, what: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``path:line``, object) for each non-blank line of ``path``.

    ``InvalidInput`` for an unreadable file (naming it as ``what``), a line that is not JSON, or
    one that is not an object, naming ``path:line``.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {what} {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise InvalidInput(f"{where} is not JSON: {exc}") from None
        if not isinstance(record, dict):
            raise InvalidInput(f"{where} must be a JSON object, got {line:.100}")
        yield where, record
