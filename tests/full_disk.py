"""Storage faults for tests: a real small filesystem (tmpfs, where the test may mount one) and an
injected one at the store's boundary (``os.fdopen`` of a ``LocalStore``'s temporary file fails as
write(2) does on a full disk), which every CI can run."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client import REGISTRY

REAL_FDOPEN = os.fdopen


def faults(kind: str) -> float:
    """``dataengine_storage_faults_total{kind}`` so far in this process."""
    return REGISTRY.get_sample_value("dataengine_storage_faults_total", {"kind": kind}) or 0.0


class FullDisk:
    """Refuses the next writes of a store under ``root`` with ``err``: ``plan`` maps a key prefix
    ("embeddings/", "items/", "" for any) to how many writes under it fail. ``refused``: the
    folders (relative to ``root``) of the writes it refused, in order."""

    def __init__(self, root: Path, plan: dict[str, int], err: int = errno.ENOSPC) -> None:
        self.root, self.plan, self.err = Path(root).resolve(), dict(plan), err
        self.refused: list[str] = []

    @property
    def left(self) -> int:
        return sum(self.plan.values())

    def fdopen(self, fd, *args, **kwargs):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.is_relative_to(self.root):
            folder = path.parent.relative_to(self.root).as_posix() + "/"
            prefix = next((p for p, n in self.plan.items() if n > 0 and folder.startswith(p)), None)
            if prefix is not None:
                self.plan[prefix] -= 1
                self.refused.append(folder)
                os.close(fd)
                raise OSError(self.err, os.strerror(self.err), str(path))
        return REAL_FDOPEN(fd, *args, **kwargs)


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(root, {"prefix/": n}, err=ENOSPC) -> FullDisk``, armed until the test ends."""

    def arm(root: Path, plan: dict[str, int], err: int = errno.ENOSPC) -> FullDisk:
        disk = FullDisk(root, plan, err)
        monkeypatch.setattr(os, "fdopen", disk.fdopen)
        return disk

    return arm


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's syntax: "1m") mounted on ``folder``; skips the test where
    mounting is not allowed (not root, a container without CAP_SYS_ADMIN)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


def remount(folder: Path, mode: str) -> None:
    """Remount the tmpfs on ``folder`` read-only ("ro") or writable ("rw")."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(folder)], check=True, capture_output=True)


def fill(folder: Path, name: str = "ballast") -> Path:
    """Write a file in ``folder`` until its filesystem is full (ENOSPC); returns the file."""
    path = folder / name
    chunk = b"\0" * (64 << 10)
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk = chunk[:len(chunk) // 2]
                if len(chunk) < 512:
                    return path
