"""A stored SAM image embedding: fp16 features plus what the decoder needs to use them."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from services.common.errors import FailedPrecondition
from services.common.pb import common_pb2


@dataclass(frozen=True)
class StoredEmbedding:
    """features: 1xCx64x64 float16 (C = 256 for the official models).

    original_size: (H, W) pixels of the image (or crop) that was embedded.
    input_size: (h, w) after ResizeLongestSide, before padding to the encoder's square input.
    crop_box: XYXY pixels of the full image that this embedding covers.
    """

    features: np.ndarray
    model_id: str
    image_id: str
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]

    def to_bytes(self) -> bytes:
        meta = {"model_id": self.model_id, "image_id": self.image_id,
                "original_size": list(self.original_size), "input_size": list(self.input_size),
                "crop_box": list(self.crop_box), "format": 1}
        buf = io.BytesIO()
        np.savez(buf, features=self.features.astype(np.float16), meta=np.array(json.dumps(meta)))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, key: str = "embedding") -> "StoredEmbedding":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                features = npz["features"]
                meta = json.loads(str(npz["meta"]))
            emb = cls(features=features, model_id=meta["model_id"], image_id=meta["image_id"],
                      original_size=tuple(meta["original_size"]), input_size=tuple(meta["input_size"]),
                      crop_box=tuple(meta["crop_box"]))
        except Exception as exc:
            raise FailedPrecondition(f"{key} is not a readable embedding: {exc}") from None
        if features.ndim != 4 or features.shape[0] != 1:
            raise FailedPrecondition(f"{key} has features of shape {features.shape}, expected 1xCxHxW")
        return emb

    def to_proto(self, key: str) -> common_pb2.EmbeddingRef:
        return common_pb2.EmbeddingRef(
            key=key, model_id=self.model_id, image_id=self.image_id,
            original_height=self.original_size[0], original_width=self.original_size[1],
            input_height=self.input_size[0], input_width=self.input_size[1], crop_box=list(self.crop_box))
