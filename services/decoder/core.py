"""The decoder service's core: interactive Predict and automatic GenerateMasks over stored embeddings.

The gRPC servicer and the Celery task only convert their inputs and call this.

Predict works in the frame of the embedded image: the full image, or for a crop embedding the
crop (prompts and masks in crop pixels; each record's crop_box says where the crop lies).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything.utils.transforms import ResizeLongestSide

from services.common import keys
from services.common.embedding import StoredEmbedding
from services.common.errors import FailedPrecondition, InvalidInput, NotFound
from services.common.masks import MaskRecord, encode_rle, sa1b_document
from services.common.metrics import EMBEDDING_CACHE
from services.common.pb import decoder_pb2
from services.common.sam_models import LoadedSam
from services.common.storage import ObjectStore
from services.decoder import amg
from services.decoder.cache import EmbeddingCache, LoadedEmbedding, LogitsCache
from services.common.amg_params import AmgParams
from services.decoder.prompt_decoder import PromptDecoder
from services.decoder.prompts import LOW_RES, Prompt

log = logging.getLogger(__name__)

LOGITS_CACHE_SIZE = 32  # recent clicks' logits, 0.25-0.75 MiB each
STABILITY_OFFSET = 1.0  # segment-anything's default stability_score_offset


@dataclass
class PredictResult:
    """Masks best first by predicted IoU, and where the low-res logits (Cx256x256) were stored."""

    masks: list[MaskRecord]
    logits_key: str

    def to_proto(self) -> decoder_pb2.PredictResponse:
        return decoder_pb2.PredictResponse(masks=[m.to_proto() for m in self.masks], logits_key=self.logits_key)


@dataclass
class GenerateResult:
    """SA-1B records of one automatic generation and where their JSON was stored."""

    image_id: str
    masks: list[MaskRecord]
    masks_key: str

    def to_proto(self) -> decoder_pb2.GenerateMasksResponse:
        return decoder_pb2.GenerateMasksResponse(image_id=self.image_id, masks=[m.to_proto() for m in self.masks],
                                                 masks_key=self.masks_key)


def upscale_logits(low_res: np.ndarray, input_size: tuple[int, int], original_size: tuple[int, int],
                   img_size: int) -> np.ndarray:
    """256x256 low-res logits -> HxW float32 logits at ``original_size``, as ``Sam.postprocess_masks``
    (bilinear to the encoder frame, crop the padding, bilinear to the original size).

    Differs from it only by float rounding (about 1e-5 of the logits' range). The result is column-major in memory (a
    transposed C array), the order COCO RLE encodes, so no full-size copy is made later. OpenCV's
    bilinear resize uses the same half-pixel centres as ``align_corners=False`` and is several times
    faster than torch's on CPU. Only the low-res rows/columns the un-padded region reads are
    upsampled (one spare on each far edge keeps every bilinear tap identical), never the padding.
    """
    scale = img_size // low_res.shape[-1]
    (in_h, in_w), (h, w) = input_size, original_size
    cols = min(low_res.shape[-1], -(-in_w // scale) + 1)
    rows = min(low_res.shape[-2], -(-in_h // scale) + 1)
    part = np.ascontiguousarray(low_res[:rows, :cols].T, dtype=np.float32)  # cols x rows
    frame = cv2.resize(part, (rows * scale, cols * scale), interpolation=cv2.INTER_LINEAR)[:in_w, :in_h]
    return cv2.resize(frame, (h, w), interpolation=cv2.INTER_LINEAR).T


def mask_record(logits: np.ndarray, predicted_iou: float, threshold: float, point_coords: list[list[float]],
                crop_box_xyxy: tuple[int, int, int, int]) -> MaskRecord:
    """HxW full-resolution logits -> one SA-1B record (bbox and area read off the RLE)."""
    mask = logits > threshold  # keeps the column-major layout of logits
    segmentation = encode_rle(mask)
    rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    # segment-anything's boxes span first to last pixel (w = right - left); COCO's count pixels.
    bbox = [x, y, w - 1, h - 1] if w > 0 else [0.0, 0.0, 0.0, 0.0]
    # Stability as segment-anything's calculate_stability_score: IoU of the masks thresholded at
    # threshold +/- offset; the high one lies inside the low one, so IoU = |high| / |low|.
    # An all-background mask (|low| = 0, where the official gives NaN) scores 0.
    low = np.count_nonzero(logits > threshold - STABILITY_OFFSET)
    stability = np.count_nonzero(logits > threshold + STABILITY_OFFSET) / low if low else 0.0
    x0, y0, x1, y1 = crop_box_xyxy
    return MaskRecord(segmentation=segmentation, bbox=[float(v) for v in bbox], area=int(mask_utils.area(rle)),
                      predicted_iou=float(predicted_iou), stability_score=float(stability),
                      point_coords=point_coords, crop_box=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)])


class _Clock:
    """Adds the seconds since the previous lap to ``timings[name]`` (no-op without timings)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[name] = self.timings.get(name, 0.0) + now - self.last
            self.last = now


class DecoderCore:
    """Predict and GenerateMasks for one loaded SAM over embeddings in ``store``.

    cache_size: embeddings kept in memory (Settings.embedding_cache_size; 0 keeps none).
    """

    def __init__(self, sam: LoadedSam, store: ObjectStore, cache_size: int) -> None:
        self.sam = sam
        self.store = store
        self.embeddings = EmbeddingCache(cache_size)
        self.logits = LogitsCache(LOGITS_CACHE_SIZE)
        self.transform = ResizeLongestSide(sam.model.image_encoder.img_size)
        # Logits go to the store in the background: the next click reads them from self.logits.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="logits-writer")
        self._pending: dict[str, Future] = {}
        self._pending_lock = threading.Lock()

    @property
    def encoder_id(self) -> str:
        """The id of the image encoder whose embeddings this decoder reads."""
        return self.sam.encoder_id

    @property
    def decoder_id(self) -> str:
        """This decoder's own id: its masks and logits are keyed by it."""
        return self.sam.decoder_id

    # -- embeddings -------------------------------------------------------------------------------

    def read_embedding(self, key: str) -> StoredEmbedding:
        """The stored embedding at ``key``; NotFound if absent, FailedPrecondition if from another encoder."""
        if not key:
            raise InvalidInput("embedding_key is empty")
        try:
            data = self.store.get(key)
        except NotFound:
            raise NotFound(f"embedding {key!r} not found; call Embed for the image first") from None
        stored = StoredEmbedding.from_bytes(data, key=f"embedding {key!r}")
        if stored.model_id != self.encoder_id:
            raise FailedPrecondition(
                f"embedding {key!r} was computed by model {stored.model_id!r} but this decoder reads "
                f"the encoder {self.encoder_id!r}; embed the image with {self.encoder_id!r}")
        channels = self.sam.model.prompt_encoder.embed_dim
        if stored.features.shape[1] != channels:
            raise FailedPrecondition(f"embedding {key!r} has {stored.features.shape[1]} channels, "
                                     f"model {self.decoder_id!r} expects {channels}")
        return stored

    def load_embedding(self, key: str) -> LoadedEmbedding:
        """The embedding at ``key`` with its float32 features and decoder on the device (cached)."""

        def load() -> LoadedEmbedding:
            stored = self.read_embedding(key)
            features = torch.from_numpy(stored.features).to(self.sam.device, torch.float32)
            return LoadedEmbedding(key, stored, features, PromptDecoder(self.sam.model, features))

        cached = self.embeddings.get(key)
        EMBEDDING_CACHE.labels("hit" if cached is not None else "miss").inc()
        return cached if cached is not None else self.embeddings.get_or_load(key, load)

    # -- Predict ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def predict(self, prompt: Prompt, timings: dict[str, float] | None = None) -> PredictResult:
        """Masks for ``prompt`` at the embedded image's original size, best first by predicted IoU.

        timings: if given, seconds spent are added under "load", "decoder", "upscale", "masks"
        (threshold, stability, RLE) and "logits" (handing them to the cache and the writer).
        """
        clock = _Clock(timings)
        emb = self.load_embedding(prompt.embedding_key)
        stored = emb.stored
        prompt.check_within(stored.original_size)
        device = self.sam.device
        points = labels = boxes = mask_input = None
        if len(prompt.points):
            coords = self.transform.apply_coords(prompt.points, stored.original_size)
            points = torch.as_tensor(coords[None], dtype=torch.float32, device=device)
            labels = torch.as_tensor(prompt.labels[None], dtype=torch.int, device=device)
        if prompt.box is not None:
            box = self.transform.apply_boxes(prompt.box[None], stored.original_size)
            boxes = torch.as_tensor(box, dtype=torch.float32, device=device)
        mask = prompt.mask_input
        if prompt.mask_input_key:
            earlier, i = self._read_logits(prompt.mask_input_key, stored), prompt.mask_input_index
            if i >= len(earlier):
                raise InvalidInput(f"mask_input_index {i} is out of range: that Predict returned {len(earlier)} masks")
            mask = earlier[i:i + 1]
        if mask is not None:
            mask_input = torch.as_tensor(mask[None], dtype=torch.float32, device=device)
        clock.lap("load")

        low_res, iou = emb.decoder(points, labels, boxes, mask_input, prompt.multimask_output)
        iou = iou[0].cpu().numpy()
        order = np.argsort(-iou, kind="stable")
        low_res, iou = low_res[0].cpu().numpy()[order], iou[order]
        clock.lap("decoder")
        img_size = self.sam.model.image_encoder.img_size
        threshold, points_list = self.sam.model.mask_threshold, prompt.points.tolist()
        records = []
        for i in range(len(iou)):
            logits = upscale_logits(low_res[i], stored.input_size, stored.original_size, img_size)
            clock.lap("upscale")
            records.append(mask_record(logits, iou[i], threshold, points_list, stored.crop_box))
            clock.lap("masks")
        key = keys.logits_key(self.decoder_id, stored.image_id, prompt.digest())
        self._save_logits(key, low_res)
        clock.lap("logits")
        return PredictResult(records, key)

    def _save_logits(self, key: str, logits: np.ndarray) -> None:
        self.logits.put(key, logits)
        buf = io.BytesIO()
        np.save(buf, logits.astype("<f4"), allow_pickle=False)
        future = self._writer.submit(self.store.put, key, buf.getvalue())
        with self._pending_lock:
            self._pending[key] = future
        future.add_done_callback(lambda f: self._written(key, f))

    def _written(self, key: str, future: Future) -> None:
        with self._pending_lock:
            if self._pending.get(key) is future:
                del self._pending[key]
        if future.exception() is not None:
            log.error("storing logits failed", extra={"key": key}, exc_info=future.exception())

    def flush(self) -> None:
        """Wait until every logits write so far has reached the store."""
        self._writer.submit(lambda: None).result()

    def _read_logits(self, key: str, stored: StoredEmbedding) -> np.ndarray:
        """Cx256x256 float32 logits of an earlier Predict on the same model and image."""
        prefix = f"logits/{self.decoder_id}/{stored.image_id}/"
        if not key.startswith(prefix):
            raise InvalidInput(f"mask_input_key {key!r} is not a logits key of this image and model "
                               f"(expected it to start with {prefix!r})")
        cached = self.logits.get(key)
        if cached is not None:
            return cached
        with self._pending_lock:
            pending = self._pending.get(key)
        if pending is not None:
            pending.result()
        try:
            data = self.store.get(key)
        except NotFound:
            raise NotFound(f"mask_input_key {key!r} not found; use the logits_key of an earlier Predict") from None
        try:
            logits = np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)
        except Exception as exc:
            raise InvalidInput(f"mask_input_key {key!r} is not a .npy array: {exc}") from None
        if logits.ndim != 3 or logits.shape[1:] != (LOW_RES, LOW_RES) or len(logits) == 0:
            raise InvalidInput(f"mask_input_key {key!r} holds shape {logits.shape}, expected Cx256x256")
        self.logits.put(key, logits)
        return logits

    # -- GenerateMasks ----------------------------------------------------------------------------

    def generate(self, embedding_key: str, params: AmgParams) -> GenerateResult:
        """SAM's automatic mask generation from the full-image embedding (and its crops' embeddings)."""
        full = self.read_embedding(embedding_key)
        h, w = full.original_size
        if tuple(full.crop_box) != (0, 0, w, h):
            raise FailedPrecondition(f"embedding {embedding_key!r} covers the crop {list(full.crop_box)}; "
                                     f"GenerateMasks needs the full-image embedding (crop box [0, 0, {w}, {h}])")
        embeddings = {}
        for box in amg.crop_boxes(full.original_size, params):
            box = tuple(int(v) for v in box)
            if box == (0, 0, w, h):
                embeddings[box] = full
                continue
            key = keys.embedding_key(self.encoder_id, full.image_id, box)
            try:
                embeddings[box] = self.read_embedding(key)
            except NotFound:
                raise FailedPrecondition(
                    f"embedding for crop box {list(box)} not found ({key!r}); call Embed with "
                    f"crop_n_layers={params.crop_n_layers} and crop_overlap_ratio={params.crop_overlap_ratio}"
                ) from None
        records = amg.generate(self.sam.model, embeddings, full.original_size, params)
        masks_key = keys.masks_key(self.decoder_id, full.image_id, params.digest())
        document = sa1b_document(full.image_id, full.original_size, records)
        self.store.put(masks_key, json.dumps(document).encode(), content_type="application/json")
        return GenerateResult(full.image_id, records, masks_key)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
