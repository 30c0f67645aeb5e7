"""Helpers shared by the command modules: errors, settings with overrides, progress, inputs."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from services.common.settings import Settings

console = Console(stderr=True)  # progress, warnings and errors
stdout = Console()  # results (tables)

# Grounding options of `run` and `concepts` (services/concepts/grounding.py), one definition for both
GROUNDING = typer.Option(None, "--grounding", help="Grounding backend: sam3, grounding_dino, owlv2 or none "
                         "(default: DATAENGINE_GROUNDING_BACKEND; none: the concepts backend's own boxes).")
GROUNDING_MODEL_DIR = typer.Option(None, "--grounding-model-dir", help="Local model directory of the grounding "
                                   "backend, e.g. a download of facebook/sam3 (DATAENGINE_GROUNDING_MODEL_DIR).")
GROUNDING_VOCABULARY = typer.Option(None, "--grounding-vocabulary/--no-grounding-vocabulary", help="Also propose "
                                    "the known labels and taxonomy categories the grounding backend finds.")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


def fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def collect_images(paths: list[Path]) -> list[Path]:
    """Files as given, folders searched recursively for image suffixes; sorted, no duplicates."""
    found: dict[Path, None] = {}
    for path in paths:
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                    found[p] = None
        elif path.is_file():
            found[path] = None
        else:
            fail(f"{path} does not exist")
    return list(found)


def file_name(path: Path, root: Path | None = None) -> str:
    """``path`` (relative to ``root``) as valid UTF-8 text for manifests, protos and reports: bytes
    of a name that are not UTF-8 are shown escaped (``bad\\xffname.png``) rather than stopping a run."""
    name = (path.relative_to(root) if root is not None else path).as_posix()
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def settings(**overrides) -> Settings:
    """Settings from the environment with command-line overrides; a bad value names the field."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}={e.get('input')!r}: {e['msg']}"
                             for e in exc.errors())
        fail(f"bad setting: {problems}")


def progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console)
