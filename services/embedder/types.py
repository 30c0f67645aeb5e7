"""Typed containers of the embedder: what comes out (references to the stored embeddings of one
image) and the crop settings it takes; what goes in is ``services.common.image_source.ImageSource``."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.embedding import StoredEmbedding
from services.common.errors import InvalidInput
from services.common.pb import common_pb2, embedder_pb2

DEFAULT_CROP_OVERLAP_RATIO = 512 / 1500  # segment-anything's SamAutomaticMaskGenerator default
MAX_CROP_N_LAYERS = 3  # 1 + 4 + 16 + 64 = 85 embeddings per image; more is a mistake, not a request


@dataclass(frozen=True)
class EmbeddingRef:
    """Where one stored embedding lives and what it covers (the features stay in the store).

    original_size: (H, W) pixels of the (crop of the) image that was embedded.
    input_size: (h, w) after ResizeLongestSide, before padding.
    crop_box: XYXY pixels of the full image.
    """

    key: str
    model_id: str
    image_id: str
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]

    @classmethod
    def of(cls, key: str, embedding: StoredEmbedding) -> "EmbeddingRef":
        return cls(key=key, model_id=embedding.model_id, image_id=embedding.image_id,
                   original_size=tuple(embedding.original_size), input_size=tuple(embedding.input_size),
                   crop_box=tuple(embedding.crop_box))

    def to_proto(self) -> common_pb2.EmbeddingRef:
        return common_pb2.EmbeddingRef(
            key=self.key, model_id=self.model_id, image_id=self.image_id,
            original_height=self.original_size[0], original_width=self.original_size[1],
            input_height=self.input_size[0], input_width=self.input_size[1], crop_box=list(self.crop_box))

    @classmethod
    def from_proto(cls, ref: common_pb2.EmbeddingRef) -> "EmbeddingRef":
        if len(ref.crop_box) != 4:
            raise InvalidInput(f"embedding {ref.key!r} has crop_box {list(ref.crop_box)}, expected XYXY")
        return cls(key=ref.key, model_id=ref.model_id, image_id=ref.image_id,
                   original_size=(ref.original_height, ref.original_width),
                   input_size=(ref.input_height, ref.input_width),
                   crop_box=tuple(int(v) for v in ref.crop_box))


@dataclass(frozen=True)
class EmbeddedImage:
    """One image's stored embeddings: the full image first, then each crop in
    segment-anything's ``generate_crop_boxes`` order."""

    image_id: str
    embeddings: tuple[EmbeddingRef, ...]

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self.embeddings]

    def to_proto(self) -> embedder_pb2.EmbeddedImage:
        return embedder_pb2.EmbeddedImage(image_id=self.image_id,
                                          embeddings=[e.to_proto() for e in self.embeddings])

    @classmethod
    def from_proto(cls, msg: embedder_pb2.EmbeddedImage) -> "EmbeddedImage":
        return cls(image_id=msg.image_id, embeddings=tuple(EmbeddingRef.from_proto(e) for e in msg.embeddings))


def check_crop_params(crop_n_layers: int, crop_overlap_ratio: float) -> None:
    """Raise ``InvalidInput`` for crop settings segment-anything could not use."""
    if not 0 <= crop_n_layers <= MAX_CROP_N_LAYERS:
        raise InvalidInput(f"crop_n_layers must be in [0, {MAX_CROP_N_LAYERS}], got {crop_n_layers}")
    if not 0.0 <= crop_overlap_ratio < 1.0:  # also rejects NaN
        raise InvalidInput(f"crop_overlap_ratio must be in [0, 1), got {crop_overlap_ratio}")
