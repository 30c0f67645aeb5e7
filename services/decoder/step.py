"""The pipeline step ``decode``: an item's grid masks, and masks for the phrases that come grounded.

Inputs: ``embedding_key`` (the full image's), ``concepts_key`` (the propose step's Proposal JSON),
``amg_params`` (optional JSON of AmgParams fields).
Writes a ``DecodeOutput`` to ``step_key(item_id, "decode")``: the grid masks' key, and each
proposed phrase with its mask where the concepts backend gave a box or a point (one Predict with
that prompt, best single mask); other positives stay image-level labels; hard negatives have no mask.
Outputs: ``masks_key``, ``decode_key``, ``count`` (grid masks).
"""

from __future__ import annotations

import numpy as np

from services.common.concepts import NounPhrase, Proposal
from services.common.decoded import DecodeOutput, GroundedPhrase
from services.common.keys import step_key
from services.common.masks import MaskRecord
from services.common.steps import StepHandler, StepRequest
from services.common.storage import ObjectStore
from services.decoder.core import DecoderCore
from services.decoder.params import params_from_json
from services.decoder.prompts import Prompt


def ground(core: DecoderCore, embedding_key: str, phrase: NounPhrase) -> list[MaskRecord]:
    """The best single mask for a phrase's box and/or point (original-image pixels), or []."""
    if phrase.box is None and phrase.point is None:
        return []
    points = np.asarray([phrase.point] if phrase.point is not None else np.zeros((0, 2)), dtype=np.float32)
    prompt = Prompt(embedding_key=embedding_key, points=points.reshape(-1, 2),
                    labels=np.ones(len(points), dtype=np.int32),
                    box=None if phrase.box is None else np.asarray(phrase.box, dtype=np.float32),
                    multimask_output=False)
    return core.predict(prompt).masks[:1]


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
        store.put(key, DecodeOutput(result.masks_key, phrases).to_bytes(), content_type="application/json")
        return {"masks_key": result.masks_key, "decode_key": key, "count": len(result.masks)}

    return handle
