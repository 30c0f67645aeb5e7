"""The pipeline step ``embed``: an item's image (by object key) to its stored embeddings.

Inputs: ``image_key``, ``source`` (optional: names the image in errors); ``amg_params`` (optional JSON of AmgParams fields): with crop layers the
crops are embedded too, so the decode step finds every embedding it needs.
Outputs: ``embedding_key`` (full image), ``image_id``, ``height``, ``width`` (pixels), ``encoder_id``
(the encoder id the embeddings carry; also as ``model_id``, its name before the decoder had its own).
"""

from __future__ import annotations

from services.common.steps import StepHandler, StepRequest
from services.common.amg_params import params_from_json
from services.embedder.core import EmbedderCore
from services.common.image_source import image_of


def make_handler(core: EmbedderCore) -> StepHandler:
    def handle(request: StepRequest) -> dict:
        params = params_from_json(request.inputs.get("amg_params"))
        (result,) = core.embed([image_of(request)], params.crop_n_layers,
                               params.crop_overlap_ratio)
        full = result.embeddings[0]
        return {"embedding_key": full.key, "image_id": result.image_id, "height": full.original_size[0],
                "width": full.original_size[1], "encoder_id": full.model_id, "model_id": full.model_id}

    return handle
