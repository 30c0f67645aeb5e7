"""Mask generation in one process: embed (full image and crops) then generate, no servers.

The same core code the embedder and decoder services run; used by ``dataengine masks`` and,
later, by the embedded mode of ``dataengine run``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidInput
from services.common.images import decode_image
from services.common.masks import sa1b_document
from services.common.sam_models import LoadedSam, load_from_settings
from services.common.settings import Settings
from services.decoder import amg
from services.common.amg_params import AmgParams
from services.embedder.core import EmbedderCore


@dataclass
class MaskPipeline:
    sam: LoadedSam
    embedder: EmbedderCore

    @classmethod
    def from_settings(cls, settings: Settings) -> "MaskPipeline":
        sam = load_from_settings(settings)
        # compute() never touches the store: nothing is written in this mode.
        return cls(sam, EmbedderCore(sam, store=None, batch_size=settings.embed_batch_size,
                                     max_pixels=settings.max_image_pixels))

    def generate_file(self, path: Path, params: AmgParams) -> dict:
        """SA-1B document of one image file."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise InvalidInput(f"cannot read {path}: {exc}") from None
        image = decode_image(data, self.embedder.max_pixels, name=str(path))
        return self.generate(image.pixels, image.image_id, params, file_name=Path(path).name)

    def generate(self, pixels, image_id: str, params: AmgParams, file_name: str = "") -> dict:
        """pixels: HxWx3 uint8 RGB. Returns the SA-1B document."""
        (embeddings,) = self.embedder.compute([pixels], crop_n_layers=params.crop_n_layers,
                                              crop_overlap_ratio=params.crop_overlap_ratio,
                                              image_ids=[image_id])
        size = (int(pixels.shape[0]), int(pixels.shape[1]))
        records = amg.generate(self.sam.model, {e.crop_box: e for e in embeddings}, size, params)
        return sa1b_document(image_id, size, records, file_name)
