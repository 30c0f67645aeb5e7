"""Grounding backends: for an image and its noun phrases, every instance of each phrase.

Concepts answers "which phrases, and where"; the decoder answers "which pixels". A grounding
backend sits on the concepts side: after the concepts backend has proposed (and cleaning), it
finds each positive phrase's instances in the image, which replace the concepts backend's own
boxes and points:

- ``sam3``: SAM 3 (``Sam3Model``), the phrase as its text prompt; its masks are kept as the
  instances' masks (the decoder does not redo them) and its scores as theirs;
- ``grounding_dino``: Grounding DINO, all phrases in one prompt ("dog. red car."), each query box
  given to the phrase whose tokens it matches best; the decoder then segments each box;
- ``owlv2``: OWLv2, the phrases as text queries; each box to its best query.

Each loads a local directory with ``from_pretrained`` (``DATAENGINE_GROUNDING_MODEL_DIR``; no hub
access at run time). Every backend's output goes through ``checked_instances``: finite boxes and
scores, masks of the image's size, boxes above ``grounding_threshold``, clipped to the image,
non-maximum suppression at ``grounding_nms_iou``, at most ``grounding_max_instances`` a phrase.
With ``grounding_vocabulary`` the backend also looks for the vocabulary (the known labels and the
taxonomy's categories) and proposes the phrases it finds, so an offline deployment with a detector
directory gets grounded positives without an MLLM.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from services.common.concepts import Instance, NounPhrase, Proposal
from services.common.errors import FailedPrecondition, InvalidInput
from services.common.masks import encode_rle
from services.common.mllm import ModelOutputError
from services.common.settings import Settings


@dataclass
class Detections:
    """One phrase's raw detections in original-image pixels: boxes (N, 4) XYXY, scores (N,) in
    [0, 1], masks (N, H, W) bool or None (a detector that only boxes)."""

    boxes: np.ndarray
    scores: np.ndarray
    masks: np.ndarray | None = None


class Grounder(Protocol):
    name: str
    source: str  # recorded on every instance it finds: "owlv2:/models/owlv2"

    def detect(self, pixels: np.ndarray, phrases: Sequence[str]) -> list[Detections]:
        """One ``Detections`` per phrase, in order, for the HxWx3 uint8 RGB image."""
        ...


@dataclass(frozen=True)
class GroundingParams:
    threshold: float = 0.3
    nms_iou: float = 0.5
    max_instances: int = 50

    @classmethod
    def from_settings(cls, settings: Settings) -> "GroundingParams":
        return cls(settings.grounding_threshold, settings.grounding_nms_iou, settings.grounding_max_instances)


def checked_instances(det: Detections, size: tuple[int, int], params: GroundingParams, source: str,
                      what: str) -> tuple[Instance, ...]:
    """A phrase's instances from its raw detections; ``ModelOutputError`` naming ``what`` and the
    field for garbage: shapes that disagree, a box or score that is not finite, a score outside
    [0, 1], masks of another size than the image's (H, W), a box above the threshold entirely
    outside the image. Boxes partly outside are clipped; under a pixel after clipping, dropped."""
    import torch
    from torchvision.ops import nms

    h, w = size
    boxes, scores = np.asarray(det.boxes, np.float64), np.asarray(det.scores, np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (len(boxes),):
        raise ModelOutputError(f"{what}: boxes are {boxes.shape} and scores {scores.shape}; expected Nx4 and N")
    for name, values in (("box", boxes), ("score", scores)):
        finite = np.isfinite(values)
        bad = np.flatnonzero(~(finite.all(axis=1) if finite.ndim == 2 else finite))
        if len(bad):
            raise ModelOutputError(f"{what}: {name} {int(bad[0])} is not finite: {values[bad[0]].tolist()}")
    if len(scores) and (scores.min() < 0 or scores.max() > 1):
        i = int(np.argmax((scores < 0) | (scores > 1)))
        raise ModelOutputError(f"{what}: score {i} is {scores[i]}, outside [0, 1]")
    masks = None if det.masks is None else np.asarray(det.masks)
    if masks is not None and masks.shape != (len(boxes), h, w):
        raise ModelOutputError(f"{what}: masks are {'x'.join(map(str, masks.shape))}, expected "
                               f"{len(boxes)}x{h}x{w} (N x H x W of the image)")
    keep = np.flatnonzero(scores >= params.threshold)
    clipped = np.stack([boxes[:, 0].clip(0, w), boxes[:, 1].clip(0, h), boxes[:, 2].clip(0, w),
                        boxes[:, 3].clip(0, h)], axis=1) if len(boxes) else boxes
    for i in keep:
        x0, y0, x1, y1 = boxes[i]
        if x0 >= w or y0 >= h or x1 <= 0 or y1 <= 0:
            raise ModelOutputError(f"{what}: box {int(i)} {[round(float(v), 1) for v in boxes[i]]} lies outside "
                                   f"the {h}x{w} image (H x W)")
    keep = [int(i) for i in keep if clipped[i, 2] - clipped[i, 0] >= 1 and clipped[i, 3] - clipped[i, 1] >= 1]
    if not keep:
        return ()
    order = nms(torch.as_tensor(clipped[keep]), torch.as_tensor(scores[keep]), params.nms_iou).tolist()
    chosen = [keep[j] for j in order][:params.max_instances]  # nms returns by decreasing score
    return tuple(Instance(box=tuple(float(v) for v in clipped[i]), score=float(scores[i]),
                          mask=None if masks is None else encode_rle(masks[i] > 0), source=source)
                 for i in chosen)


def ground_proposal(grounder: Grounder, params: GroundingParams, pixels: np.ndarray, proposal: Proposal,
                    vocabulary: Sequence[str] = (), max_positives: int = 1 << 30) -> Proposal:
    """``proposal`` with every positive's instances found by ``grounder`` (a phrase it does not
    find keeps none: an image-level label), then the ``vocabulary`` phrases it finds that were not
    proposed added as positives (score: their best instance's), up to ``max_positives`` phrases in
    all. A hard negative it finds is a positive now: the pixels outweigh a guess of absence."""
    proposed = [p.text for p in proposal.phrases]
    extra = [v for v in dict.fromkeys(vocabulary) if v not in set(proposed)]
    texts = proposed + extra
    if not texts:
        return proposal
    found = grounder.detect(pixels, texts)
    if len(found) != len(texts):
        raise ModelOutputError(f"{grounder.source} answered {len(found)} detection sets for {len(texts)} phrases")
    size = pixels.shape[:2]
    instances = {t: checked_instances(d, size, params, grounder.source, f"{grounder.source} output for {t!r}")
                 for t, d in zip(texts, found)}
    phrases = [replace(p, instances=instances[p.text]) for p in proposal.phrases]
    for text in extra:
        if instances[text] and len(phrases) < max_positives:
            phrases.append(NounPhrase(text, max(i.score for i in instances[text]), grounder.source, instances[text]))
    present = {p.text for p in phrases}
    return Proposal(phrases, [n for n in proposal.hard_negatives if n.text not in present])


# -- the backends ---------------------------------------------------------------------------------

def _load(model_dir: Path | None, name: str, model_class: str):
    """(processor, model) from a local directory, read by transformers' own ``from_pretrained``."""
    if model_dir is None:
        raise FailedPrecondition(f"grounding backend {name!r} needs DATAENGINE_GROUNDING_MODEL_DIR, a local "
                                 "directory with the model (save_pretrained / huggingface-cli download)")
    if not Path(model_dir).is_dir():
        raise FailedPrecondition(f"DATAENGINE_GROUNDING_MODEL_DIR {model_dir} is not a directory")
    import transformers

    try:
        processor = transformers.AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
        model = getattr(transformers, model_class).from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise FailedPrecondition(f"grounding backend {name!r}: {model_dir} holds no {model_class}: {exc}") from None
    return processor, model.eval()


class _TorchGrounder:
    """What the three share: loading, the device, one forward at a time per process."""

    model_class = ""

    def __init__(self, name: str, model_dir: Path | None, device: str = "cpu") -> None:
        self.name, self.source = name, f"{name}:{model_dir}"
        self.processor, model = _load(model_dir, name, self.model_class)
        self.device = device
        self.model = model.to(device)
        self._lock = threading.Lock()  # gRPC threads share the model; one forward at a time

    def detect(self, pixels: np.ndarray, phrases: Sequence[str]) -> list[Detections]:
        import torch

        with self._lock, torch.inference_mode():  # a writable copy: torch will not wrap a read-only array
            return self._detect(np.array(pixels, dtype=np.uint8), list(phrases))

    def _detect(self, pixels: np.ndarray, phrases: list[str]) -> list[Detections]:
        raise NotImplementedError


class Sam3Grounder(_TorchGrounder):
    """SAM 3: the image encoded once, then one text prompt per phrase; masks at the image's size."""

    model_class = "Sam3Model"
    mask_threshold = 0.5

    def _detect(self, pixels, phrases):
        h, w = pixels.shape[:2]
        image = self.processor(images=pixels, return_tensors="pt").to(self.device)
        vision = self.model.get_vision_features(pixel_values=image["pixel_values"])
        out = []
        for phrase in phrases:
            text = self.processor(text=phrase, return_tensors="pt").to(self.device)
            outputs = self.model(vision_embeds=vision, input_ids=text["input_ids"], attention_mask=text["attention_mask"])
            [res] = self.processor.post_process_instance_segmentation(
                outputs, threshold=0.0, mask_threshold=self.mask_threshold, target_sizes=[(h, w)])
            out.append(Detections(res["boxes"].float().cpu().numpy(), res["scores"].float().cpu().numpy(),
                                  res["masks"].cpu().numpy().astype(bool)))
        return out


class GroundingDinoGrounder(_TorchGrounder):
    """Grounding DINO: phrases in prompts of "a. b. c." that fit its text length; each query box
    goes to the phrase whose tokens score highest for it (its span between the periods)."""

    model_class = "GroundingDinoForObjectDetection"

    def _detect(self, pixels, phrases):
        h, w = pixels.shape[:2]
        tok = self.processor.tokenizer
        limit = int(getattr(self.model.config, "max_text_len", 256))
        chunks, chunk = [], []
        for phrase in phrases:  # [CLS] a . b . [SEP]: each phrase's tokens and its period
            if chunk and len(tok(". ".join(chunk + [phrase]) + ".")["input_ids"]) > limit:
                chunks.append(chunk)
                chunk = []
            chunk.append(phrase)
        chunks.append(chunk)
        result: dict[str, Detections] = {}
        for chunk in chunks:
            result.update(self._one_prompt(pixels, chunk, (h, w)))
        return [result[p] for p in phrases]

    def _one_prompt(self, pixels, phrases, size):
        import torch

        h, w = size
        inputs = self.processor(images=pixels, text=". ".join(phrases) + ".", return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        ids = inputs["input_ids"][0].tolist()
        stops = {self.processor.tokenizer.cls_token_id, self.processor.tokenizer.sep_token_id,
                 *self.processor.tokenizer.convert_tokens_to_ids([".", "?"])}
        spans, start = [], None
        for k, token in enumerate(ids):
            if token in stops:
                if start is not None:
                    spans.append((start, k))
                start = None
            elif start is None:
                start = k
        spans = spans[:len(phrases)]
        probs = outputs.logits[0].sigmoid()  # (queries, text positions)
        per_phrase = torch.stack([probs[:, a:b].max(dim=1).values for a, b in spans], dim=1)  # (Q, P)
        best = per_phrase.argmax(dim=1)
        cx, cy, bw, bh = outputs.pred_boxes[0].float().unbind(-1)  # normalised to the image
        boxes = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
        out = {}
        for j, phrase in enumerate(phrases):
            mine = (best == j) if j < len(spans) else torch.zeros_like(best, dtype=torch.bool)
            scores = per_phrase[:, j][mine] if j < len(spans) else per_phrase.new_zeros(0)
            out[phrase] = Detections(boxes[mine].cpu().numpy(), scores.float().cpu().numpy())
        return out


class Owlv2Grounder(_TorchGrounder):
    """OWLv2: the phrases as text queries of one image; each box to its best query. OWLv2 pads the
    image to a square (bottom, right): boxes centred in the padding are detections of nothing."""

    model_class = "Owlv2ForObjectDetection"

    def _detect(self, pixels, phrases):
        h, w = pixels.shape[:2]
        inputs = self.processor(text=[phrases], images=pixels, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        [res] = self.processor.image_processor.post_process_object_detection(
            outputs, threshold=0.0, target_sizes=[(h, w)])
        boxes, scores, labels = (res["boxes"].float().cpu().numpy(), res["scores"].float().cpu().numpy(),
                                 res["labels"].cpu().numpy())
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        inside = (cx < w) & (cy < h)
        return [Detections(boxes[inside & (labels == j)], scores[inside & (labels == j)]) for j in range(len(phrases))]


def _factory(cls, name: str) -> Callable[[Settings], Grounder]:
    return lambda settings: cls(name, settings.grounding_model_dir, settings.device)


GROUNDERS: dict[str, Callable[[Settings], Grounder]] = {
    "sam3": _factory(Sam3Grounder, "sam3"),
    "grounding_dino": _factory(GroundingDinoGrounder, "grounding_dino"),
    "owlv2": _factory(Owlv2Grounder, "owlv2"),
}


def make_grounder(name: str, settings: Settings) -> Grounder | None:
    """The grounding backend ``name`` ("" or "none": None, the concepts backend's own instances)."""
    if name in ("", "none"):
        return None
    if name not in GROUNDERS:
        raise InvalidInput(f"unknown grounding backend {name!r}; choose one of {', '.join(sorted(GROUNDERS))} "
                           "or none")
    return GROUNDERS[name](settings)
