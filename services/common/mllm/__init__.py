"""Two ways to reach a multimodal model, shared by the concepts and verifier services.

- ``endpoint.EndpointClient``: an OpenAI-compatible chat endpoint (vLLM, TGI, Ollama) through the
  ``openai`` package, with its timeouts and retries.
- ``local.LocalModel``: a local model directory through transformers' ``AutoProcessor`` and
  ``AutoModelForImageTextToText``.

Both answer the same two questions about one image and one prompt: free text (``chat`` /
``generate``) and scores of answer choices for the next token (``choice_logprobs`` /
``choice_logits``). Errors are the project's: ``TransientError`` (timeouts, connection, 429, 5xx),
``FailedPrecondition`` (the model or endpoint cannot serve this), ``InvalidInput`` (a bad image,
or an unusable answer: ``ModelOutputError``, "model output").

This package imports neither ``openai`` nor ``torch``; each module imports its own library, so a
service that uses only one way never loads the other.
"""

from __future__ import annotations

import numpy as np

from services.common.errors import InvalidInput


def check_pixels(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` if it is an HxWx3 uint8 RGB image with H, W >= 1; ``InvalidInput`` otherwise."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 \
            or pixels.shape[2] != 3 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        shape = getattr(pixels, "shape", None)
        dtype = getattr(pixels, "dtype", type(pixels).__name__)
        raise InvalidInput(f"a model's image must be HxWx3 uint8 RGB, got shape {shape} of {dtype}")
    return pixels


class ModelOutputError(InvalidInput):
    """The model answered, but with nothing usable (empty, not the JSON asked for). A backend may
    ask once more; the caller sees an ``InvalidInput`` whose message starts "model output"."""
