"""The ``concepts`` command: one image's proposal (noun phrases and hard negatives) as JSON on stdout.

Thin: it reads the file, calls the same ``ConceptsCore.propose`` the service runs, and prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from services.app.cli_common import GROUNDING, GROUNDING_MODEL_DIR, GROUNDING_VOCABULARY, fail
from services.app.cli_common import settings as make_settings
from services.common.errors import DataEngineError, InvalidInput, NotFound

LABEL_HELP = ("A noun phrase known to be in the image (repeat for more); the offline backends propose "
              "these and the ontology contrasts them with hard negatives.")


def concepts(
    image: Path = typer.Argument(..., help="An image file."),
    label: list[str] = typer.Option([], "--label", "--labels", help=LABEL_HELP),
    backend: Optional[str] = typer.Option(
        None, "--backend", help="labels, ontology, openai or transformers (default: DATAENGINE_CONCEPTS_BACKEND)."),
    max_positives: int = typer.Option(0, "--max-positives", min=0,
                                      help="Most noun phrases (0: DATAENGINE_CONCEPTS_MAX_POSITIVES)."),
    max_negatives: int = typer.Option(0, "--max-negatives", min=0,
                                      help="Most hard negatives (0: DATAENGINE_CONCEPTS_MAX_NEGATIVES)."),
    grounding: Optional[str] = GROUNDING,
    grounding_model_dir: Optional[Path] = GROUNDING_MODEL_DIR,
    grounding_vocabulary: Optional[bool] = GROUNDING_VOCABULARY,
    more_labels: Optional[list[str]] = typer.Argument(None, hidden=True, metavar="[PHRASE ...]"),
) -> None:
    """Propose noun phrases and hard negatives for IMAGE; prints the proposal as JSON.

    Exit status 2 for bad input (a missing or unreadable image, an empty label, an unknown
    backend), 1 when the backend fails (a model that times out, or answers no proposal).
    Several labels: --labels dog frisbee, or --label dog --label frisbee.
    """
    from services.common.mllm import ModelOutputError
    from services.concepts.core import ConceptsCore
    from services.common.image_source import ImageSource

    if not image.is_file():
        fail(f"{image} does not exist or is not a file")
    # Click options take one value each: the phrases after the first --labels arrive as arguments.
    label = [*label, *(more_labels or [])]
    settings = make_settings(grounding_backend=grounding, grounding_model_dir=grounding_model_dir,
                             grounding_vocabulary=grounding_vocabulary)
    try:
        source = ImageSource(data=image.read_bytes(), filename=str(image))  # errors name the file
    except OSError as exc:
        fail(f"cannot read {image}: {exc.strerror or exc}")
    try:
        core = ConceptsCore(backend or settings.concepts_backend, None, settings.max_image_pixels, settings)
        proposal = core.propose(source, label, max_positives, max_negatives)
    except ModelOutputError as exc:  # the model's fault, not the caller's
        fail(str(exc), code=1)
    except (InvalidInput, NotFound) as exc:
        fail(str(exc))
    except DataEngineError as exc:
        fail(str(exc), code=1)
    if not label and not core.backend.needs_pixels:
        typer.echo(f"note: no --label given; the {core.backend.name} backend proposes only from known labels",
                   err=True)
    typer.echo(json.dumps(proposal.to_json(), indent=2))


def register(app: typer.Typer) -> None:
    app.command()(concepts)
