"""An OpenAI-compatible chat endpoint with image input (vLLM, TGI, Ollama, OpenAI itself).

The image travels inline as a base64 PNG data URL (no URL the server would have to fetch).
Timeouts and retries are the ``openai`` client's own: ``timeout_s`` per attempt, ``max_retries``
further attempts on timeouts, connection errors, 408/409/429 and 5xx, with its exponential backoff
(or the server's ``retry-after``). What is left after the retries becomes a project error:

- no answer in time, no connection, 429 or 5xx: ``TransientError`` naming the endpoint;
- another 4xx (bad request, unknown model, bad key): ``FailedPrecondition`` with the server's message;
- an empty or missing answer: ``ModelOutputError``, an ``InvalidInput`` ("model output").
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any, Sequence

import numpy as np
import openai
from PIL import Image

from services.common.errors import FailedPrecondition, InvalidInput, TransientError
from services.common.mllm import ModelOutputError, check_pixels

# OpenAI's documented maximum; vLLM accepts up to its --max-logprobs (20 by default as well).
TOP_LOGPROBS = 20


def png_data_url(pixels: np.ndarray) -> str:
    """``data:image/png;base64,...`` of an HxWx3 uint8 RGB image (lossless, so the model sees
    exactly these pixels)."""
    buf = io.BytesIO()
    Image.fromarray(check_pixels(pixels), mode="RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _server_message(exc: openai.APIStatusError) -> str:
    """The server's own words: OpenAI and vLLM put them in ``error.message`` (the client has
    already unwrapped ``error``), others send a bare string."""
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    if isinstance(body, str) and body.strip():
        return body.strip()
    return exc.message


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def first_token_scores(top: Sequence[tuple[str, float]], choices: Sequence[str]) -> dict[str, float]:
    """Log-probability that the answer starts with each choice, from the first token's top list.

    top: (token, logprob) alternatives at the first position. A token counts for a choice when,
    stripped of whitespace, it is a non-empty prefix of the choice ("A" and " A" both count for
    "A"; "y" counts for "yes"); the probabilities of the tokens that count are summed.

    A choice no listed token starts is not impossible, only less likely than the listed tokens: it
    gets the most it can have, the probability the list leaves over shared among such choices,
    and never more than the least listed token (``missing_choice_bound``). Counting it as 0 would
    let an accepting letter listed alone at 0.2% score 1.0. No choice listed at all: all -inf.
    """
    unique = dict(top)  # the sampled token is usually listed among the alternatives too
    scores: dict[str, float] = {}
    for choice in choices:
        key = choice.strip()
        hits = [lp for token, lp in unique.items() if token.strip() and key.startswith(token.strip())]
        scores[choice] = _logsumexp(hits) if hits else -math.inf
    missing = [c for c in choices if scores[c] == -math.inf]
    if unique and missing and len(missing) < len(choices):
        bound = missing_choice_bound(list(unique.values()), len(missing))
        scores.update((c, bound) for c in missing)
    return scores


def missing_choice_bound(listed: Sequence[float], missing: int) -> float:
    """Log-probability bound of each of ``missing`` tokens absent from a top list of ``listed``
    log-probabilities: at most the least listed one, and together at most what the list leaves
    (1 - its total mass); -inf when the list holds all the mass."""
    rest = 1.0 - sum(math.exp(lp) for lp in listed)
    share = rest / missing
    if share <= 0.0:
        return -math.inf
    return min(min(listed), math.log(share))


class EndpointClient:
    """One model behind an OpenAI-compatible ``/chat/completions``.

    base_url: the API root, e.g. ``http://vllm:8000/v1``. model: the served model's name.
    api_key: bearer token; "" sends the placeholder "EMPTY" (the openai client insists on a key;
    servers without auth ignore it). timeout_s: seconds per attempt. max_retries: attempts after
    the first. Thread-safe: the underlying HTTP client is shared by all calls.
    """

    def __init__(self, base_url: str, model: str, api_key: str = "", timeout_s: float = 60.0,
                 max_retries: int = 2) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise FailedPrecondition(f"endpoint base URL must start with http:// or https://, got {base_url!r}")
        if not model:
            raise FailedPrecondition(f"endpoint {base_url}: no model name given")
        self.base_url, self.model = base_url.rstrip("/"), model
        self.timeout_s, self.max_retries = float(timeout_s), int(max_retries)
        # URL and key passed explicitly, so the client never falls back to OPENAI_BASE_URL or
        # OPENAI_API_KEY: only Settings reads the environment.
        self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "EMPTY", timeout=self.timeout_s,
                                     max_retries=self.max_retries)

    @property
    def name(self) -> str:
        """How errors name this endpoint: base URL and model."""
        return f"endpoint {self.base_url} (model {self.model!r})"

    def chat(self, pixels: np.ndarray, prompt: str, max_tokens: int) -> str:
        """The model's answer (greedy: temperature 0) to ``prompt`` about the HxWx3 uint8 RGB
        image ``pixels``, at most ``max_tokens`` tokens. An empty answer is ``InvalidInput``."""
        response = self._create(pixels, prompt, max_tokens=max_tokens)
        text = self._message(response).content
        if not isinstance(text, str) or not text.strip():
            raise ModelOutputError(f"model output of {self.name} is empty")
        return text

    def choice_logprobs(self, pixels: np.ndarray, prompt: str, choices: list[str]) -> dict[str, float]:
        """Log-probability of each choice as the first token of the answer (see
        ``first_token_scores``: a choice not among the top 20 tokens gets a bound).

        ``FailedPrecondition`` when the endpoint answers without logprobs, or without the top
        alternatives (some servers ignore the request): the choices cannot be scored from the
        sampled token alone.
        """
        if not choices:
            raise InvalidInput("choice_logprobs needs at least one choice")
        response = self._create(pixels, prompt, max_tokens=1, logprobs=True, top_logprobs=TOP_LOGPROBS)
        self._message(response)  # a response without any choice is a model-output error
        content = getattr(response.choices[0].logprobs, "content", None)
        if not content:
            raise FailedPrecondition(f"{self.name}: endpoint gives no logprobs "
                                     "(the choices cannot be scored; use a server that returns them)")
        first = content[0]
        if not first.top_logprobs:
            raise FailedPrecondition(f"{self.name}: endpoint gives logprobs but no top_logprobs alternatives "
                                     f"(asked for {TOP_LOGPROBS}; the choices cannot be scored from one token)")
        top = [(t.token, float(t.logprob)) for t in first.top_logprobs]
        top.append((first.token, float(first.logprob)))
        return first_token_scores(top, choices)

    def _message(self, response: Any) -> Any:
        try:
            return response.choices[0].message
        except (AttributeError, IndexError, TypeError):
            raise ModelOutputError(f"model output of {self.name} is missing: the response has no choice") from None

    def _create(self, pixels: np.ndarray, prompt: str, **params: Any) -> Any:
        """One chat completion with the image then the prompt, errors mapped (module docstring)."""
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data_url(pixels)}},
            {"type": "text", "text": prompt}]}]
        attempts = self.max_retries + 1
        tries = f"after {attempts} attempt{'s' if attempts > 1 else ''}"
        try:
            return self._client.chat.completions.create(model=self.model, messages=messages, temperature=0.0,
                                                        **params)
        except openai.APITimeoutError:
            raise TransientError(f"{self.name}: no answer within {self.timeout_s:g} s, {tries}") from None
        except openai.APIConnectionError as exc:
            raise TransientError(f"{self.name}: cannot connect ({exc.__cause__ or exc}), {tries}") from None
        except openai.APIStatusError as exc:
            status, message = exc.status_code, _server_message(exc)
            if status in (408, 409, 429) or status >= 500:
                raise TransientError(f"{self.name}: HTTP {status} {tries}: {message}") from None
            raise FailedPrecondition(f"{self.name} refused the request (HTTP {status}): {message}") from None
        except openai.APIResponseValidationError as exc:
            raise ModelOutputError(f"model output of {self.name} is not a chat completion: {exc.message}") from None
