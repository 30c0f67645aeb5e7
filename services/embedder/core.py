"""The embedder core: images in, SAM image embeddings (fp16) out, in batches of one forward pass.

Preprocessing is segment-anything's ``SamPredictor.set_image``, step for step (ResizeLongestSide
on the uint8 image, normalise, pad to the encoder's square input), so a stored embedding equals
the official predictor's features up to fp16 rounding. The gRPC servicer, the Celery task and the
in-process pipeline all call this one class.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from segment_anything.utils.amg import generate_crop_boxes
from segment_anything.utils.transforms import ResizeLongestSide

from services.common import keys
from services.common.embedding import StoredEmbedding
from services.common.errors import InvalidInput
from services.common.images import decode_image
from services.common.keys import sha256_hex
from services.common.sam_models import LoadedSam
from services.common.storage import ObjectStore
from services.common.image_source import ImageSource
from services.embedder.types import DEFAULT_CROP_OVERLAP_RATIO, EmbeddedImage, EmbeddingRef, check_crop_params

log = logging.getLogger(__name__)

CropBox = tuple[int, int, int, int]


@dataclass(frozen=True)
class _Job:
    """One encoder input: an image or one of its crops."""

    image_index: int
    crop_box: CropBox  # XYXY pixels of the full image
    pixels: np.ndarray  # HxWx3 uint8, the crop


class EmbedderCore:
    """SAM image encoder over an object store.

    batch_size: images (and crops) per encoder forward pass.
    max_pixels: decode limit per image (decompression-bomb guard).
    store: may be None for callers that only ``compute`` (the in-process pipeline).
    """

    def __init__(self, sam: LoadedSam, store: ObjectStore | None, batch_size: int, max_pixels: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sam = sam
        self.store = store
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.transform = ResizeLongestSide(sam.model.image_encoder.img_size)
        # One forward pass at a time: concurrent gRPC requests would multiply peak memory
        # without making a saturated device any faster.
        self._forward_lock = threading.Lock()

    @property
    def model_id(self) -> str:
        """The encoder id every embedding of this core carries (``LoadedSam.encoder_id``)."""
        return self.sam.encoder_id

    # -- pure computation ---------------------------------------------------------------------

    def encode(self, crops: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Run the encoder once over ``crops`` (each HxWx3 uint8, any sizes).

        Returns the fp32 features (BxCx64x64, on the model's device) and each input's
        (h, w) after ResizeLongestSide.
        """
        model, device = self.sam.model, self.sam.device
        batch, input_sizes = [], []
        for pixels in crops:
            resized = self.transform.apply_image(pixels)  # HxWx3 uint8, longest side = img_size
            tensor = torch.as_tensor(resized, device=device).permute(2, 0, 1).contiguous()[None]
            input_sizes.append((int(tensor.shape[-2]), int(tensor.shape[-1])))
            batch.append(model.preprocess(tensor))  # 1x3xSxS float32, normalised and padded
        with self._forward_lock, torch.inference_mode():
            features = model.image_encoder(torch.cat(batch, dim=0))
        return features, input_sizes

    def compute(self, pixels_list: Sequence[np.ndarray], crop_n_layers: int = 0,
                crop_overlap_ratio: float = DEFAULT_CROP_OVERLAP_RATIO,
                image_ids: Sequence[str] | None = None,
                names: Sequence[str] | None = None) -> list[list[StoredEmbedding]]:
        """Embed each image (HxWx3 uint8 RGB) and, with ``crop_n_layers`` > 0, each of its crops
        from ``generate_crop_boxes`` (full image first, the official order).

        image_ids: one per image (default: sha256 of the pixel bytes). names: used in errors.
        Returns one list per image of fp16 embeddings; nothing is stored.
        """
        check_crop_params(crop_n_layers, crop_overlap_ratio)
        names = list(names) if names is not None else [f"image {i}" for i in range(len(pixels_list))]
        if image_ids is None:
            image_ids = [sha256_hex(np.ascontiguousarray(p).tobytes()) for p in pixels_list]
        if len(image_ids) != len(pixels_list) or len(names) != len(pixels_list):
            raise ValueError(f"{len(pixels_list)} images but {len(image_ids)} ids and {len(names)} names")
        jobs = [job for i, pixels in enumerate(pixels_list)
                for job in self._jobs(i, pixels, crop_n_layers, crop_overlap_ratio, names[i])]

        results: list[list[StoredEmbedding]] = [[] for _ in pixels_list]
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            features, input_sizes = self.encode([job.pixels for job in chunk])
            features = features.float().cpu().numpy()
            for job, feats, input_size in zip(chunk, features, input_sizes):
                h, w = job.pixels.shape[:2]
                results[job.image_index].append(StoredEmbedding(
                    features=feats[None].astype(np.float16), model_id=self.model_id,
                    image_id=image_ids[job.image_index], original_size=(int(h), int(w)),
                    input_size=input_size, crop_box=job.crop_box))
        return results

    def _jobs(self, index: int, pixels: np.ndarray, crop_n_layers: int, crop_overlap_ratio: float,
              name: str) -> Iterable[_Job]:
        if not (isinstance(pixels, np.ndarray) and pixels.ndim == 3 and pixels.shape[2] == 3
                and pixels.dtype == np.uint8):
            shape = getattr(pixels, "shape", None)
            raise InvalidInput(f"{name}: expected HxWx3 uint8 pixels, got shape {shape} "
                               f"dtype {getattr(pixels, 'dtype', type(pixels).__name__)}")
        h, w = int(pixels.shape[0]), int(pixels.shape[1])
        boxes, _ = generate_crop_boxes((h, w), crop_n_layers, crop_overlap_ratio)
        for x0, y0, x1, y1 in boxes:
            if x1 <= x0 or y1 <= y0:
                raise InvalidInput(f"{name} is {w}x{h} pixels: too small for crop_n_layers={crop_n_layers} "
                                   f"(crop box {[x0, y0, x1, y1]} is empty)")
            self._check_resizable(y1 - y0, x1 - x0, name)
            yield _Job(index, (int(x0), int(y0), int(x1), int(y1)), pixels[y0:y1, x0:x1, :])

    def _check_resizable(self, h: int, w: int, name: str) -> None:
        # ResizeLongestSide rounds the short side; past ~2048:1 it rounds to 0 pixels and the
        # official code fails deep inside torchvision. Say so up front.
        new_h, new_w = ResizeLongestSide.get_preprocess_shape(h, w, self.transform.target_length)
        if new_h < 1 or new_w < 1:
            raise InvalidInput(f"{name} is {w}x{h} pixels: aspect ratio too extreme to resize to "
                               f"{self.transform.target_length} px on its longest side")

    # -- with the store ------------------------------------------------------------------------

    def embed(self, inputs: Sequence[ImageSource | bytes | str], crop_n_layers: int = 0,
              crop_overlap_ratio: float = DEFAULT_CROP_OVERLAP_RATIO) -> list[EmbeddedImage]:
        """Decode, store and embed ``inputs`` (encoded bytes, object keys or ``ImageSource``s).

        The image bytes are kept at ``images/<image_id>`` and each embedding at its deterministic
        key, so re-running overwrites. Results come in input order.
        """
        if self.store is None:
            raise RuntimeError("EmbedderCore.embed needs an object store; compute() works without one")
        if not inputs:
            raise InvalidInput("no images to embed")
        check_crop_params(crop_n_layers, crop_overlap_ratio)
        sources = [ImageSource.of(value) for value in inputs]
        names = [source.describe(i) for i, source in enumerate(sources)]

        decoded = []
        for source, name in zip(sources, names):
            data = source.data if source.data is not None else self.store.get(source.key)
            image = decode_image(data, self.max_pixels, name=name)
            image_key = keys.image_key(image.image_id)
            if source.key != image_key:  # content-addressed: rewriting the same bytes is harmless
                self.store.put(image_key, data)
            decoded.append(image)

        embeddings = self.compute([d.pixels for d in decoded], crop_n_layers, crop_overlap_ratio,
                                  image_ids=[d.image_id for d in decoded], names=names)
        results = []
        for image, image_embeddings in zip(decoded, embeddings):
            refs = []
            for emb in image_embeddings:
                key = keys.embedding_key(emb.model_id, emb.image_id, emb.crop_box)
                self.store.put(key, emb.to_bytes())
                refs.append(EmbeddingRef.of(key, emb))
            results.append(EmbeddedImage(image_id=image.image_id, embeddings=tuple(refs)))
            log.info("embedded", extra={"image_id": image.image_id, "key": refs[0].key})
        return results


def crop_boxes(size: tuple[int, int], crop_n_layers: int,
               crop_overlap_ratio: float = DEFAULT_CROP_OVERLAP_RATIO) -> list[CropBox]:
    """The XYXY crop boxes (full image first) embedded for an image of ``size`` (H, W)."""
    boxes, _ = generate_crop_boxes(size, crop_n_layers, crop_overlap_ratio)
    return [tuple(int(v) for v in box) for box in boxes]

