"""Small builders for decoder tests: images and embeddings computed with segment-anything itself
(independent of our embedder), stored the way the embedder stores them."""

from __future__ import annotations

import numpy as np
import torch
from segment_anything import SamPredictor

from services.common import keys
from services.common.embedding import StoredEmbedding
from services.common.sam_models import LoadedSam


def blob_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """HxWx3 uint8: smooth blobs, so random-weight SAMs still produce masks with structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.zeros((h, w, 3), np.float32)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.4) * min(h, w)
        image += (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)[..., None] * rng.uniform(30, 120, 3)
    return np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)


def embed(sam: LoadedSam, pixels: np.ndarray, image_id: str,
          crop_box: tuple[int, int, int, int] | None = None, model_id: str | None = None) -> StoredEmbedding:
    """The official SamPredictor.set_image features of ``pixels`` (or of its ``crop_box``), as fp16."""
    h, w = pixels.shape[:2]
    crop_box = crop_box or (0, 0, w, h)
    x0, y0, x1, y1 = crop_box
    predictor = SamPredictor(sam.model)
    predictor.set_image(pixels[y0:y1, x0:x1])
    return StoredEmbedding(features=predictor.features.cpu().numpy().astype(np.float16),
                           model_id=model_id or sam.encoder_id, image_id=image_id,
                           original_size=tuple(predictor.original_size), input_size=tuple(predictor.input_size),
                           crop_box=tuple(crop_box))


def put(store, emb: StoredEmbedding) -> str:
    """Store ``emb`` at its deterministic key and return the key."""
    key = keys.embedding_key(emb.model_id, emb.image_id, emb.crop_box)
    store.put(key, emb.to_bytes())
    return key


def official_predictor(sam: LoadedSam, emb: StoredEmbedding) -> SamPredictor:
    """A SamPredictor set to exactly the stored (fp16-rounded) features, no image encoder run."""
    predictor = SamPredictor(sam.model)
    predictor.reset_image()
    predictor.features = torch.from_numpy(emb.features).float()
    predictor.original_size = tuple(emb.original_size)
    predictor.input_size = tuple(emb.input_size)
    predictor.is_image_set = True
    return predictor
