"""The pipeline step ``decode``: an item's grid masks, and a mask for every instance of every phrase.

Inputs: ``embedding_key`` (the full image's), ``concepts_key`` (the propose step's Proposal JSON),
``amg_params`` (optional JSON of AmgParams fields).
Writes a ``DecodeOutput`` to ``step_key(item_id, "decode")``: the grid masks' key, and each
proposed phrase with one mask per instance: the instance's own mask when its backend segments
(SAM 3; it must have the image's size), else one Predict with its box and/or point (best single
mask). Each mask records who made it (``MaskRecord.source``). A positive without instances stays
an image-level label; hard negatives have no mask.
Outputs: ``masks_key``, ``decode_key``, ``count`` (grid masks), ``instances`` (phrase masks),
``encoder_id`` and ``decoder_id`` (the models that read the embedding and made the masks).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from services.common.concepts import Instance, NounPhrase, Proposal
from services.common.decoded import DecodeOutput, GroundedPhrase
from services.common.errors import InvalidInput
from services.common.keys import step_key
from services.common.masks import MaskRecord
from services.common.review import checked_mask
from services.common.steps import StepHandler, StepRequest
from services.common.storage import ObjectStore
from services.decoder.core import DecoderCore
from services.common.amg_params import params_from_json
from services.decoder.prompts import Prompt


def ground(core: DecoderCore, embedding_key: str, phrase: NounPhrase) -> list[MaskRecord]:
    """One mask per instance of ``phrase``, in its order (original-image pixels)."""
    return [instance_mask(core, embedding_key, inst, f"phrase {phrase.text!r} instance {j}")
            for j, inst in enumerate(phrase.instances)]


def instance_mask(core: DecoderCore, embedding_key: str, inst: Instance, what: str) -> MaskRecord:
    """The instance's own mask (checked against the image's size; scored by the backend, and
    stable by construction: it is binary), else SAM's best single mask for its box and/or point."""
    if inst.mask is not None:
        size = tuple(core.load_embedding(embedding_key).stored.original_size)  # cached: no store read per mask
        return checked_mask(MaskRecord(inst.mask, [], 0, inst.score, 1.0, source=inst.source), size,
                            f"{what} mask from {inst.source or 'the grounding backend'}")
    points = np.asarray([inst.point] if inst.point is not None else np.zeros((0, 2)), dtype=np.float32)
    prompt = Prompt(embedding_key=embedding_key, points=points.reshape(-1, 2),
                    labels=np.ones(len(points), dtype=np.int32),
                    box=None if inst.box is None else np.asarray(inst.box, dtype=np.float32),
                    multimask_output=False)
    try:
        best = core.predict(prompt).masks[0]
    except InvalidInput as exc:
        raise InvalidInput(f"{what}: {exc}") from None
    return replace(best, source=f"sam1:{core.decoder_id}")


def make_handler(core: DecoderCore, store: ObjectStore) -> StepHandler:
    def handle(request: StepRequest) -> dict:
        embedding_key = request.need("embedding_key")
        params = params_from_json(request.inputs.get("amg_params"))
        concepts_key = request.need("concepts_key")
        proposal = Proposal.from_bytes(store.get(concepts_key), concepts_key)
        result = core.generate(embedding_key, params)
        phrases = [GroundedPhrase(p.text, False, masks, bool(masks), p.source)
                   for p in proposal.phrases for masks in [ground(core, embedding_key, p)]]
        phrases += [GroundedPhrase(n.text, True, [], False, n.source) for n in proposal.hard_negatives]
        key = step_key(request.item_id, "decode")
        store.put(key, DecodeOutput(result.masks_key, phrases, len(result.masks)).to_bytes(), content_type="application/json")
        return {"masks_key": result.masks_key, "decode_key": key, "count": len(result.masks),
                "instances": sum(len(p.masks) for p in phrases), "encoder_id": core.encoder_id,
                "decoder_id": core.decoder_id}

    return handle
