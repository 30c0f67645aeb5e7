"""Multimodal verifier backends: a local model (``transformers``) or an OpenAI-compatible endpoint
(``openai``) answers multiple-choice questions about masks, as SAM 3's verifiers do.

Checks (prompt templates in ``prompts/``, one letter per choice):
- mask (MV), per phrase and mask: accept / accept as text / flag label / whole image / reject;
- exhaustivity (EV), per phrase and its masks: accept / reject / reject but unseparated /
  flag label / whole image / ungroundable;
- hard negative (HN), per phrase: absent (accept) / present.

A check's score is the probability of its accepting choice: the softmax over the choice letters'
next-token logits (local) or log-probabilities (endpoint), so it is in [0, 1] whatever the model's
vocabulary. Its choice is the most probable letter's.

Aggregation (what the orchestrator routes on):
- a phrase with masks: min(mean of its MV scores, its EV score): every mask must be good and
  none may be missing;
- a phrase without masks (an image-level label): P(present) from the HN question, since the label
  claims presence and nothing can be checked about masks;
- a hard negative: its HN score, P(absent);
- the item: the minimum over its pairs (the weakest pair decides), or 0.0 with no pair.
An ungrounded label's accepting answer is "present": its HN verdict keeps the model's choice and
scores P(present).
A check left out of ``checks`` is skipped; a pair with no check left is left out of the result.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Protocol, Sequence

import numpy as np

from services.common.errors import FailedPrecondition, InvalidInput
from services.common.masks import MaskRecord
from services.common.settings import Settings
from services.common.verdicts import PairVerdict, Verdict, Verification
from services.verifier.render import composite, mask_array

# check -> [(choice, letter)] in prompt order; the first choice is the accepting one
CHOICES = {
    "mask": [("accept", "A"), ("accept_as_text", "B"), ("flag_label", "C"), ("whole_image", "D"), ("reject", "E")],
    "exhaustivity": [("accept", "A"), ("reject", "B"), ("reject_unseparated", "C"), ("flag_label", "D"),
                     ("whole_image", "E"), ("ungroundable", "F")],
    "hard_negative": [("absent", "A"), ("present", "B")],
}


class ChoiceModel(Protocol):
    """Scores answer letters: log-probabilities or logits (only their differences matter)."""

    def choice_scores(self, pixels: np.ndarray, prompt: str, letters: list[str]) -> dict[str, float]: ...


def template(check: str) -> str:
    return resources.files("services.verifier.prompts").joinpath(f"{check}.txt").read_text(encoding="utf-8")


def softmax(scores: dict[str, float], letters: list[str], source: str) -> list[float]:
    """Probabilities of ``letters`` from their scores (-inf or no score: 0); none scored is
    ``InvalidInput``, as the model did not answer with a choice."""
    values = [scores.get(letter, -math.inf) for letter in letters]
    if any(isinstance(v, float) and math.isnan(v) for v in values):
        raise InvalidInput(f"model output of {source}: a choice score is NaN")
    top = max(values)
    if top == -math.inf:
        raise InvalidInput(f"model output of {source}: none of the choices {letters} is among its answers")
    weights = [math.exp(v - top) for v in values]
    total = sum(weights)
    return [w / total for w in weights]


class ModelVerifier:
    """A verifier backend over any ``ChoiceModel``; ``name`` is its registry name."""

    needs_pixels = True

    def __init__(self, model: ChoiceModel, name: str, source: str) -> None:
        self.model, self.name, self.source = model, name, source
        self.templates = {check: template(check) for check in CHOICES}

    def ask(self, check: str, picture: np.ndarray, phrase: str, count: int = 0) -> tuple[str, float]:
        """(most probable choice, probability of the accepting choice) of one question."""
        choices = CHOICES[check]
        letters = [letter for _, letter in choices]
        prompt = self.templates[check].format(phrase=phrase, count=count)
        probs = softmax(self.model.choice_scores(picture, prompt, letters), letters, self.source)
        best = max(range(len(choices)), key=probs.__getitem__)
        return choices[best][0], probs[0]

    def verify(self, pixels: np.ndarray | None, pairs, grid_masks: Sequence[MaskRecord],
               checks: frozenset[str]) -> Verification:
        if pixels is None:
            raise InvalidInput(f"verifier backend {self.name!r} needs the image")
        size = pixels.shape[:2]
        results = []
        for pair in pairs:
            arrays = [mask_array(m, size, f"pair {pair.phrase!r} mask {i}") for i, m in enumerate(pair.masks)]
            verdicts: list[Verdict] = []
            if pair.is_negative or not arrays:
                if "hard_negative" in checks:
                    choice, absent = self.ask("hard_negative", composite(pixels, []), pair.phrase)
                    score = absent if pair.is_negative else 1.0 - absent
                    verdicts.append(Verdict("hard_negative", choice, score, self.source, pair.phrase))
            else:
                if "mask" in checks:
                    for i, array in enumerate(arrays):
                        choice, p = self.ask("mask", composite(pixels, [array]), pair.phrase)
                        verdicts.append(Verdict("mask", choice, p, self.source, pair.phrase, [i]))
                if "exhaustivity" in checks:
                    choice, p = self.ask("exhaustivity", composite(pixels, arrays), pair.phrase, len(arrays))
                    verdicts.append(Verdict("exhaustivity", choice, p, self.source, pair.phrase,
                                            list(range(len(arrays)))))
            if verdicts:
                results.append(PairVerdict(pair.phrase, pair.is_negative, pair_score(verdicts), verdicts,
                                           mask_count=len(arrays)))
        return Verification(results, min((r.score for r in results), default=0.0))


def pair_score(verdicts: Sequence[Verdict]) -> float:
    """min(mean of the mask verdicts, the exhaustivity verdict); a lone HN verdict is its own score."""
    masks = [v.score for v in verdicts if v.check == "mask"]
    parts = ([sum(masks) / len(masks)] if masks else []) + [v.score for v in verdicts if v.check != "mask"]
    return min(parts)


class _EndpointChoices:
    def __init__(self, client) -> None:
        self.client = client

    def choice_scores(self, pixels, prompt, letters):
        return self.client.choice_logprobs(pixels, prompt, letters)


class _LocalChoices:
    def __init__(self, model) -> None:
        self.model = model

    def choice_scores(self, pixels, prompt, letters):
        return self.model.choice_logits(pixels, prompt, letters)


def openai_verifier(settings: Settings) -> ModelVerifier:
    """The ``openai`` backend: ``DATAENGINE_VERIFIER_ENDPOINT`` and ``DATAENGINE_VERIFIER_MODEL``."""
    if not settings.verifier_endpoint or not settings.verifier_model:
        raise FailedPrecondition("the openai verifier needs DATAENGINE_VERIFIER_ENDPOINT and "
                                 "DATAENGINE_VERIFIER_MODEL")
    from services.common.mllm.endpoint import EndpointClient

    client = EndpointClient(settings.verifier_endpoint, settings.verifier_model, settings.mllm_api_key,
                            settings.mllm_timeout_s, settings.mllm_max_retries)
    return ModelVerifier(_EndpointChoices(client), "openai", f"openai:{settings.verifier_model}")


def transformers_verifier(settings: Settings) -> ModelVerifier:
    """The ``transformers`` backend: a local model directory, ``DATAENGINE_VERIFIER_MODEL_DIR``."""
    if settings.verifier_model_dir is None:
        raise FailedPrecondition("the transformers verifier needs DATAENGINE_VERIFIER_MODEL_DIR")
    from services.common.mllm.local import LocalModel

    model = LocalModel.load(settings.verifier_model_dir, settings.device, settings.mllm_timeout_s)
    return ModelVerifier(_LocalChoices(model), "transformers",
                         f"transformers:{settings.verifier_model_dir.expanduser().name}")
