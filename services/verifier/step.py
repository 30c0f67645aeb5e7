"""The pipeline step ``verify``: an item's decoded phrases and grid masks to its ``Verification``.

Inputs: ``decode_key`` (the decode step's ``DecodeOutput`` JSON: the grid masks' key and each
phrase with its masks), ``concepts_key`` (the propose step's ``Proposal``: hard negatives missing
from the decode output are verified too), ``image_key`` (optional; read by backends that need pixels).
Writes the Verification JSON to ``step_key(item_id, "verify")`` (re-running overwrites it).
Outputs: ``verify_key``, ``score`` (the item's, in [0, 1]).
"""

from __future__ import annotations

import json

from services.common.concepts import Proposal
from services.common.decoded import DecodeOutput
from services.common.errors import InvalidInput
from services.common.keys import step_key
from services.common.masks import MaskRecord
from services.common.steps import StepHandler, StepRequest
from services.common.storage import ObjectStore
from services.verifier.core import PhrasePair, VerifierCore


def read_grid_masks(store: ObjectStore, key: str) -> list[MaskRecord]:
    """The annotations of the SA-1B JSON at ``key``; ``InvalidInput`` if it is not one."""
    data = store.get(key)  # NotFound and TransientError pass through as they are
    try:
        doc = json.loads(data)
        return [MaskRecord.from_json(a) for a in doc["annotations"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"grid masks {key!r} are not an SA-1B document: {exc!r}") from None


def phrase_pairs(decoded: DecodeOutput, proposal: Proposal) -> list[PhrasePair]:
    """The decoded phrases in their order, then the proposal's hard negatives the decode output lacks."""
    pairs = [PhrasePair(p.phrase, p.masks, p.is_negative) for p in decoded.phrases]
    known = {p.phrase.casefold() for p in pairs}
    pairs += [PhrasePair(n.text, [], True) for n in proposal.hard_negatives if n.text.casefold() not in known]
    return pairs


def make_handler(core: VerifierCore, store: ObjectStore) -> StepHandler:
    def handle(request: StepRequest) -> dict:
        decode_key = request.need("decode_key")
        decoded = DecodeOutput.from_bytes(store.get(decode_key), decode_key)
        concepts_key = request.need("concepts_key")
        proposal = Proposal.from_bytes(store.get(concepts_key), concepts_key)
        image_key = request.inputs.get("image_key")
        verification = core.verify(phrase_pairs(decoded, proposal), read_grid_masks(store, decoded.masks_key),
                                   image=request.need("image_key") if image_key is not None else None)
        key = step_key(request.item_id, "verify")
        store.put(key, json.dumps(verification.to_json()).encode(), content_type="application/json")
        return {"verify_key": key, "score": float(verification.score)}

    return handle
