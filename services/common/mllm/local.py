"""A local multimodal model directory through transformers (Qwen2.5-VL, Llama 3.2 Vision, LLaVA, ...).

The directory is what ``save_pretrained`` writes for a model and its processor (config, weights,
tokenizer, image processor, chat template); it is loaded with ``local_files_only`` so a missing
file is an error here, never a download. The prompt goes through the processor's chat template
as one user turn holding the image then the text, and decoding is greedy.
"""

from __future__ import annotations

import inspect
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (AutoModelForImageTextToText, AutoProcessor, StoppingCriteria, StoppingCriteriaList)

from services.common.errors import FailedPrecondition, InvalidInput, TransientError
from services.common.mllm import ModelOutputError, check_pixels


class _Deadline(StoppingCriteria):
    """Stops generation once ``seconds`` have passed since it was made, and remembers that it did
    (a cut-off answer must not pass for a finished one). Checked after each new token, so one
    forward pass (the prompt's prefill) can overrun it."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.hit = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        self.hit = self.hit or time.monotonic() >= self.end
        return torch.full((input_ids.shape[0],), self.hit, dtype=torch.bool, device=input_ids.device)


class LocalModel:
    """A multimodal model and its processor, loaded once and shared by threads (one call at a
    time: concurrent calls would only compete for the same device memory).

    name: how errors name it ("local model PATH"). timeout_s: default time limit per call.
    """

    def __init__(self, model: torch.nn.Module, processor, name: str, device: str, timeout_s: float = 60.0) -> None:
        self.model, self.processor, self.name = model, processor, name
        self.device, self.timeout_s = device, float(timeout_s)
        self._lock = threading.Lock()
        # Only the last position's logits are needed to score choices; asking the model for just
        # those saves a (sequence x vocabulary) float tensor, ~600 MB for Qwen2.5-VL on a big image.
        self._keeps_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._choice_cache: dict[tuple[str, ...], dict[str, list[int]]] = {}

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", timeout_s: float = 60.0) -> "LocalModel":
        """Load ``model_dir`` (AutoProcessor and AutoModelForImageTextToText, local files only)
        onto ``device`` ("cpu", "cuda", "cuda:1") in the dtype its config names.

        ``FailedPrecondition`` naming the path when the directory, a file or the chat template is
        missing, or transformers cannot load what is there.
        """
        path = Path(model_dir).expanduser()
        if not path.is_dir():
            raise FailedPrecondition(f"model directory {path} does not exist")
        if not (path / "config.json").is_file():
            raise FailedPrecondition(f"model directory {path} has no config.json (not a save_pretrained directory)")
        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype="auto")
            model = model.to(device).eval()
        except Exception as exc:  # OSError, ValueError, ImportError, CUDA errors...: all mean "cannot load"
            raise FailedPrecondition(f"cannot load the model in {path}: {type(exc).__name__}: {exc}") from None
        if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
            raise FailedPrecondition(f"the processor in {path} has no image processor or no tokenizer "
                                     "(not a multimodal model)")
        if not getattr(processor, "chat_template", None):
            raise FailedPrecondition(f"the processor in {path} has no chat template (chat_template.jinja)")
        return cls(model, processor, f"local model {path}", device, timeout_s)

    def _inputs(self, pixels: np.ndarray, prompt: str):
        """The processor's tensors for one user turn (image, then ``prompt``) and the assistant's cue."""
        image = Image.fromarray(check_pixels(pixels), mode="RGB")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        try:
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = self.processor(text=[text], images=[image], return_tensors="pt")
        except ValueError as exc:  # e.g. an aspect ratio the image processor refuses
            raise InvalidInput(f"{self.name} cannot take this image ({image.width}x{image.height}): {exc}") from None
        # Floating tensors (pixel values) follow the weights' dtype; ids stay integers.
        return inputs.to(self.device, dtype=self.model.dtype)

    def generate(self, pixels: np.ndarray, prompt: str, max_new_tokens: int, timeout_s: float | None = None) -> str:
        """The model's greedy answer to ``prompt`` about the HxWx3 uint8 RGB image, at most
        ``max_new_tokens`` tokens, special tokens removed.

        timeout_s: time limit (default: the model's), counted from when this call has the model.
        Past it generation stops and the call raises ``TransientError``; an empty answer is
        ``InvalidInput`` ("model output").
        """
        if max_new_tokens < 1:
            raise InvalidInput(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        limit = self.timeout_s if timeout_s is None else float(timeout_s)
        with self._lock:
            deadline = _Deadline(limit)
            inputs = self._inputs(pixels, prompt)
            with torch.inference_mode():
                # temperature/top_p/top_k unset: the model's sampling defaults do not apply to greedy decoding
                out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                          top_p=None, top_k=None, stopping_criteria=StoppingCriteriaList([deadline]))
        if deadline.hit:
            raise TransientError(f"{self.name}: generation passed the time limit of {limit:g} s "
                                 f"(DATAENGINE_MLLM_TIMEOUT_S)")
        new_tokens = out[0, inputs["input_ids"].shape[1]:]
        text = self.processor.decode(new_tokens, skip_special_tokens=True)
        if not text.strip():
            raise ModelOutputError(f"model output of {self.name} is empty")
        return text

    def choice_logits(self, pixels: np.ndarray, prompt: str, choices: list[str]) -> dict[str, float]:
        """Next-token score of each choice at the start of the assistant's answer: the logsumexp
        of the logits of its first token bare and after a space ("A" and " A": a chat template
        ending in "Assistant:" is answered with the second), as the endpoint path sums both.
        Logits, not log-probabilities: only differences between choices mean anything.
        ``InvalidInput`` when a choice has no token, or two choices start with the same one."""
        if not choices:
            raise InvalidInput("choice_logits needs at least one choice")
        token_ids = self._choice_ids(tuple(choices))
        extra = {"logits_to_keep": 1} if self._keeps_last else {}
        with self._lock:
            inputs = self._inputs(pixels, prompt)
            with torch.inference_mode():
                logits = self.model(**inputs, **extra).logits[0, -1].float()
        return {choice: float(torch.logsumexp(logits[ids], dim=0)) for choice, ids in token_ids.items()}

    def _choice_ids(self, choices: tuple[str, ...]) -> dict[str, list[int]]:
        """Choice -> the ids of its first token, bare and spaced (see ``choice_logits``); worked
        out once per set of choices, as every question of a check asks the same letters."""
        known = self._choice_cache.get(choices)
        if known is not None:
            return known
        tokenizer = self.processor.tokenizer
        token_ids: dict[str, list[int]] = {}
        owner: dict[int, str] = {}
        for choice in choices:
            ids = []
            for spelling in (choice, " " + choice):
                pieces = tokenizer(spelling, add_special_tokens=False)["input_ids"]
                # a lone space piece (SentencePiece's "▁" before "A") starts every spaced choice
                if pieces and tokenizer.decode(pieces[:1]).strip() and int(pieces[0]) not in ids:
                    ids.append(int(pieces[0]))
            if not ids:
                raise InvalidInput(f"choice {choice!r} is no token of {self.name}")
            for i in ids:
                if owner.setdefault(i, choice) != choice:
                    raise InvalidInput(f"choices {owner[i]!r} and {choice!r} both start with token {i} of "
                                       f"{self.name}: the model's answer cannot tell them apart")
            token_ids[choice] = ids
        self._choice_cache[choices] = token_ids
        return token_ids
