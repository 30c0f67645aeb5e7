"""Model backends of the concepts service: a multimodal model looks at the image and proposes noun
phrases (with a box or point where it can locate them) and hard negatives, as strict JSON.

- ``openai``: an OpenAI-compatible endpoint (``DATAENGINE_CONCEPTS_ENDPOINT``, ``DATAENGINE_CONCEPTS_MODEL``);
- ``transformers``: a local model directory (``DATAENGINE_CONCEPTS_MODEL_DIR``).

Both render ``prompts/propose.txt``, ask the model, and parse its answer with ``parse_proposal``.
A malformed answer gets one repair attempt (``prompts/repair.txt``: the request again, what was
wrong and the start of the bad answer); a second malformed answer is ``InvalidInput`` naming
"model output" and quoting the start of the answer. Timeouts and unreachable endpoints are not
repaired: they propagate (``TransientError``) for the caller's retry policy.

Coordinates: the prompt asks for boxes ``[x0, y0, x1, y1]`` and points ``[x, y]`` on a 0-1000
scale relative to the image (as Qwen2-VL and Qwen3-VL ground natively; Qwen2.5-VL grounds in
pixels of its resized input, which no caller can know in general, so a scale independent of any
resizing is the one that works across models and endpoints). ``parse_proposal`` converts them to
pixels of the original image, XYXY, clipped to it.
"""

from __future__ import annotations

import json
import math
import re
from importlib import resources
from string import Template
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np

from services.common.concepts import HardNegative, Instance, NounPhrase, Proposal, merge_instances
from services.common.errors import FailedPrecondition, InvalidInput
from services.common.mllm import ModelOutputError, check_pixels
from services.common.settings import Settings

if TYPE_CHECKING:
    from services.common.mllm.endpoint import EndpointClient
    from services.common.mllm.local import LocalModel

MAX_ANSWER_CHARS = 64 * 1024  # what is parsed of an answer; a runaway model is cut off here
MAX_ITEMS = 256  # items read per list, before the request's caps (bounds the work on a huge list)
MAX_PHRASE_CHARS = 120  # longer is a sentence, not a noun phrase
MAX_JSON_STARTS = 4  # '{' positions tried per chunk of text (bounds the work on brace-rich garbage)
SCALE = 1000.0  # the prompt's coordinate scale
QUOTE_CHARS = 200  # how much of a bad answer an error message quotes
REPAIR_QUOTE_CHARS = 2000  # how much of a bad answer the repair prompt shows the model

_FENCE = re.compile(r"```[A-Za-z]*[ \t]*\n?(.*?)```", re.S)
_DECODER = json.JSONDecoder()


def template(name: str) -> Template:
    """The prompt template ``prompts/NAME.txt`` (``$field`` placeholders)."""
    return Template(resources.files("services.concepts.prompts").joinpath(f"{name}.txt").read_text(encoding="utf-8"))


def extract_json(answer: str) -> dict:
    """The JSON object with a "phrases" key in a model's answer: inside a ```json fence or with
    text around it. Only the first ``MAX_ANSWER_CHARS`` characters are read; no such object is
    ``ModelOutputError``."""
    text = answer[:MAX_ANSWER_CHARS]
    chunks = [m.group(1) for m in _FENCE.finditer(text)][:2] + [text]
    other = None  # the first object without "phrases", to say what came instead
    for chunk in chunks:
        start = chunk.find("{")
        for _ in range(MAX_JSON_STARTS):
            if start < 0:
                break
            try:
                value, _ = _DECODER.raw_decode(chunk, start)
            except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
                value = None
            if isinstance(value, dict):
                if "phrases" in value:
                    return value
                other = value if other is None else other
            start = chunk.find("{", start + 1)
    where = (f"its first {MAX_ANSWER_CHARS} characters (of {len(answer)})" if len(answer) > MAX_ANSWER_CHARS
             else "it")
    found = "" if other is None else f"; the first object has keys {sorted(other)[:8]}"
    raise ModelOutputError(f"no complete JSON object with \"phrases\" in {where}{found}")


def _number(value: Any, what: str) -> float:
    # bool is an int in Python, but never a coordinate or a score in JSON
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelOutputError(f"{what} must be a finite number, got {value!r:.60}")
    return float(value)


def _coords(value: Any, n: int, what: str) -> list[float] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ModelOutputError(f"{what} must be {n} numbers or null, got {value!r:.80}")
    return [_number(v, f"{what}[{i}]") for i, v in enumerate(value)]


def scale_box(box: list[float] | None, height: int, width: int) -> tuple[float, float, float, float] | None:
    """A 0-1000 box as XYXY pixels of an HxW image: corners sorted (a model may swap them),
    clipped to the image; None when less than a pixel wide or high after clipping."""
    if box is None:
        return None
    xs = sorted(min(max(v * width / SCALE, 0.0), float(width)) for v in (box[0], box[2]))
    ys = sorted(min(max(v * height / SCALE, 0.0), float(height)) for v in (box[1], box[3]))
    if xs[1] - xs[0] < 1.0 or ys[1] - ys[0] < 1.0:
        return None
    return xs[0], ys[0], xs[1], ys[1]


def scale_point(point: list[float] | None, height: int, width: int) -> tuple[float, float] | None:
    """A 0-1000 point as XY pixels; None when outside the image (clipping would move it onto
    something else)."""
    if point is None:
        return None
    x, y = point[0] * width / SCALE, point[1] * height / SCALE
    return (x, y) if 0.0 <= x <= width and 0.0 <= y <= height else None


def _item(value: Any, what: str) -> dict:
    """An item of either list: an object with "text", or a bare string (its text)."""
    if isinstance(value, str):
        value = {"text": value}
    if not isinstance(value, dict):
        raise ModelOutputError(f"{what} must be an object with \"text\", got {value!r:.80}")
    text = value.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ModelOutputError(f"{what} needs a non-empty \"text\", got {text!r:.80}")
    text = " ".join(text.split())
    if len(text) > MAX_PHRASE_CHARS:
        raise ModelOutputError(f"{what} text is {len(text)} characters, over {MAX_PHRASE_CHARS}: {text[:60]!r}...")
    return {**value, "text": text}


def _instances(item: dict, what: str, size: tuple[int, int], source: str) -> tuple[Instance, ...]:
    """A phrase's instances in pixels: its "instances" list, and the one "box"/"point" of the
    one-instance answer shape; unusable geometry drops the instance, never the phrase."""
    height, width = size
    raw = item.get("instances")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise ModelOutputError(f"{what} instances must be a list, got {type(raw).__name__}")
    entries = [(f"{what}", item)] if ("box" in item or "point" in item) else []
    for j, inst in enumerate(raw[:MAX_ITEMS]):
        if not isinstance(inst, dict):
            raise ModelOutputError(f"{what} instances[{j}] must be an object, got {inst!r:.80}")
        entries.append((f"{what} instances[{j}]", inst))
    instances = []
    for where, d in entries:
        box = scale_box(_coords(d.get("box"), 4, f"{where} box"), height, width)
        point = scale_point(_coords(d.get("point"), 2, f"{where} point"), height, width)
        score = _number(d.get("score", item.get("score", 1.0)), f"{where} score")
        if box is not None or point is not None:
            instances.append(Instance(box, point, score, source=source))
    return merge_instances(instances)


def _list(data: dict, key: str, required: bool) -> list:
    value = data.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise ModelOutputError(f"\"{key}\" must be a list, got {type(value).__name__}"
                               + (" (missing)" if key not in data else ""))
    return value[:MAX_ITEMS]


def parse_proposal(answer: str, image_size: tuple[int, int], source: str) -> Proposal:
    """Parse a model's answer into a ``Proposal``.

    answer: the model's text (the JSON object of ``prompts/propose.txt``, fences and text around
    it tolerated, only its first ``MAX_ANSWER_CHARS`` read). image_size: (height, width) in pixels
    of the image the model saw, as ``pixels.shape[:2]``. source: recorded on every phrase.

    Each phrase's instances (its "instances" list, or the one "box"/"point" of the older answer
    shape) are converted from 0-1000 to pixels (``scale_box``, ``scale_point``); unusable geometry
    drops the instance, keeping the phrase. A repeated phrase (case-insensitive) is merged into its
    first occurrence (instances joined, duplicates by box IoU removed, the higher score); a hard
    negative that is also a positive is dropped; every hard negative's reason is "model". Anything else malformed is ``ModelOutputError`` (an ``InvalidInput``) saying what.
    """
    height, width = image_size
    try:
        data = extract_json(answer)
        positives, negatives = _list(data, "phrases", True), _list(data, "hard_negatives", False)
        by_text: dict[str, NounPhrase] = {}
        for i, raw in enumerate(positives):
            item, what = _item(raw, f"phrases[{i}]"), f"phrases[{i}]"
            phrase = NounPhrase(item["text"], _number(item.get("score", 1.0), f"{what} score"), source,
                                _instances(item, what, (height, width), source))
            folded = phrase.text.casefold()  # a phrase given twice: one phrase with both's instances
            by_text[folded] = by_text[folded].merged(phrase) if folded in by_text else phrase
        phrases = list(by_text.values())
        seen = set(by_text)
        hard_negatives = []
        for i, raw in enumerate(negatives):
            item, what = _item(raw, f"hard_negatives[{i}]"), f"hard_negatives[{i}]"
            score = _number(item.get("score", 1.0), f"{what} score")
            if item["text"].casefold() not in seen:
                seen.add(item["text"].casefold())
                hard_negatives.append(HardNegative(item["text"], "model", score, source))
        return Proposal(phrases, hard_negatives)
    except InvalidInput as exc:  # ours, and NounPhrase's own checks (a score outside [0, 1])
        raise ModelOutputError(f"model output of {source} is not a proposal: {exc}") from None


class _Answers(Protocol):
    def __call__(self, pixels: np.ndarray, prompt: str) -> str: ...


class ModelConcepts:
    """A concepts backend over any function (pixels, prompt) -> answer text.

    name: registry name. source: recorded on the proposal ("openai:MODEL", "transformers:DIR").
    max_positives, max_negatives: caps used when a request gives 0.
    """

    needs_pixels = True

    def __init__(self, answer: _Answers, name: str, source: str, max_positives: int = 20,
                 max_negatives: int = 20) -> None:
        self.answer, self.name, self.source = answer, name, source
        self.max_positives, self.max_negatives = max_positives, max_negatives
        self.propose_prompt, self.repair_prompt = template("propose"), template("repair")

    def propose(self, pixels: np.ndarray | None, known_labels: Sequence[str], max_positives: int = 0,
                max_negatives: int = 0) -> Proposal:
        """pixels: HxWx3 uint8 RGB. Caps of 0 mean the backend's. See the module docstring."""
        if pixels is None:
            raise InvalidInput(f"concepts backend {self.name!r} needs the image")
        check_pixels(pixels)
        positives, negatives = max_positives or self.max_positives, max_negatives or self.max_negatives
        prompt = self.propose_prompt.substitute(
            known_labels=json.dumps(list(known_labels), ensure_ascii=False) if known_labels else "none",
            max_positives=positives, max_negatives=negatives)
        answer = ""
        try:
            answer = self.answer(pixels, prompt)
            proposal = parse_proposal(answer, pixels.shape[:2], self.source)
        except ModelOutputError as first:
            repair = self.repair_prompt.substitute(prompt=prompt, error=str(first),
                                                   answer=answer[:REPAIR_QUOTE_CHARS] or "(nothing)")
            answer = ""
            try:
                answer = self.answer(pixels, repair)
                proposal = parse_proposal(answer, pixels.shape[:2], self.source)
            except ModelOutputError as second:
                raise ModelOutputError(f"{second} (after one repair attempt; the answer, {len(answer)} characters, "
                                       f"began {answer[:QUOTE_CHARS]!r})") from None
        return Proposal(proposal.phrases[:positives], proposal.hard_negatives[:negatives])


class OpenAIConcepts(ModelConcepts):
    """The ``openai`` backend: an ``EndpointClient`` (or anything with its ``chat``)."""

    def __init__(self, client: "EndpointClient", max_new_tokens: int = 512, max_positives: int = 20,
                 max_negatives: int = 20) -> None:
        self.client, self.max_new_tokens = client, max_new_tokens
        super().__init__(self._chat, "openai", f"openai:{client.model}", max_positives, max_negatives)

    def _chat(self, pixels: np.ndarray, prompt: str) -> str:
        return self.client.chat(pixels, prompt, self.max_new_tokens)

    @classmethod
    def from_settings(cls, settings: Settings) -> "OpenAIConcepts":
        missing = [name for name, value in (("DATAENGINE_CONCEPTS_ENDPOINT", settings.concepts_endpoint),
                                            ("DATAENGINE_CONCEPTS_MODEL", settings.concepts_model)) if not value]
        if missing:
            raise FailedPrecondition(f"the openai concepts backend needs {' and '.join(missing)}")
        from services.common.mllm.endpoint import EndpointClient

        client = EndpointClient(settings.concepts_endpoint, settings.concepts_model, settings.mllm_api_key,
                                settings.mllm_timeout_s, settings.mllm_max_retries)
        return cls(client, settings.mllm_max_new_tokens, settings.concepts_max_positives,
                   settings.concepts_max_negatives)


class TransformersConcepts(ModelConcepts):
    """The ``transformers`` backend: a ``LocalModel`` (or anything with its ``generate``)."""

    def __init__(self, model: "LocalModel", source: str, max_new_tokens: int = 512, max_positives: int = 20,
                 max_negatives: int = 20) -> None:
        self.model, self.max_new_tokens = model, max_new_tokens
        super().__init__(self._generate, "transformers", source, max_positives, max_negatives)

    def _generate(self, pixels: np.ndarray, prompt: str) -> str:
        return self.model.generate(pixels, prompt, self.max_new_tokens)

    @classmethod
    def from_settings(cls, settings: Settings) -> "TransformersConcepts":
        if settings.concepts_model_dir is None:
            raise FailedPrecondition("the transformers concepts backend needs DATAENGINE_CONCEPTS_MODEL_DIR "
                                     "(a local model directory written by save_pretrained)")
        from services.common.mllm.local import LocalModel

        model = LocalModel.load(settings.concepts_model_dir, settings.device, settings.mllm_timeout_s)
        return cls(model, f"transformers:{settings.concepts_model_dir.expanduser().name}",
                   settings.mllm_max_new_tokens, settings.concepts_max_positives, settings.concepts_max_negatives)
