"""Official SAM checkpoints: download from the published URL, check SHA-256, keep in a folder.

Our build machines are offline; there the download fails with a message saying what to do instead.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from services.common.errors import FailedPrecondition, InvalidInput
from services.common.sam_models import OFFICIAL_CHECKPOINTS, file_sha256

CHUNK = 1024 * 1024


class CheckpointDownloadError(FailedPrecondition):
    """The checkpoint could not be downloaded, or what came was not the published file."""


def fetch_checkpoint(name: str, dest_dir: Path | str, url: str | None = None, sha256: str | None = None,
                     timeout: float = 60.0,
                     progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Download the official checkpoint ``name`` (vit_h, vit_l, vit_b) into ``dest_dir``.

    url/sha256 default to the published ones (tests point them at a loopback server).
    A file already there with the right hash is kept without downloading. ``progress`` is called
    with (bytes so far, total bytes or None). Returns the checkpoint's path.
    """
    if name not in OFFICIAL_CHECKPOINTS:
        raise InvalidInput(f"no official checkpoint named {name!r}; choose one of {sorted(OFFICIAL_CHECKPOINTS)}")
    official = OFFICIAL_CHECKPOINTS[name]
    url = url or official.url
    expected = (sha256 or official.sha256).lower()
    dest_dir = Path(dest_dir).expanduser()
    path = dest_dir / official.filename
    if path.is_file() and file_sha256(path) == expected:
        return path
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{official.filename}.", suffix=".part")
    except OSError as exc:
        raise CheckpointDownloadError(f"cannot write checkpoints to {dest_dir}: {exc}") from None
    tmp = Path(tmp_name)
    try:
        got = _download(url, fd, timeout, progress)
        if got != expected:
            raise CheckpointDownloadError(
                f"{url} downloaded but its SHA-256 is {got}, expected {expected}; the file was deleted")
        os.replace(tmp, path)  # the final name only ever holds a verified file
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _download(url: str, fd: int, timeout: float, progress: Callable[[int, int | None], None] | None) -> str:
    """Stream ``url`` into the open file ``fd`` while hashing; returns the SHA-256 hex."""
    digest = hashlib.sha256()
    done = 0
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            while block := response.read(CHUNK):
                out.write(block)
                digest.update(block)
                done += len(block)
                if progress is not None:
                    progress(done, total)
        if total is not None and done != total:
            raise CheckpointDownloadError(f"cannot download {url}: got {done} of {total} bytes")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        # HTTPError's str carries the status code; URLError's reason is the socket error.
        reason = exc if isinstance(exc, urllib.error.HTTPError) else (getattr(exc, "reason", None) or exc)
        raise CheckpointDownloadError(
            f"cannot download {url}: {reason}; download it elsewhere and pass --checkpoint PATH") from None
    return digest.hexdigest()
