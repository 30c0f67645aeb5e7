"""The pipeline step ``propose``: an item's image and known labels to its stored ``Proposal``.

Inputs: ``image_key`` (str), ``source`` (optional, names the image in errors), ``known_labels``
(list of str, may be empty or absent).
Writes the Proposal JSON to ``step_key(item_id, "propose")`` (re-running overwrites it).
Outputs: ``concepts_key``, ``phrases`` and ``hard_negatives`` (how many of each).
"""

from __future__ import annotations

from services.common.errors import InvalidInput
from services.common.keys import step_key
from services.common.steps import StepHandler, StepRequest
from services.common.storage import ObjectStore
from services.concepts.core import ConceptsCore
from services.common.image_source import image_of


def make_handler(core: ConceptsCore, store: ObjectStore) -> StepHandler:
    def handle(request: StepRequest) -> dict:
        labels = request.inputs.get("known_labels")
        labels = [] if labels is None else labels
        if not isinstance(labels, list):
            raise InvalidInput(f"step 'propose' of item {request.item_id} needs known_labels as a list, "
                               f"got {labels!r:.100}")
        proposal = core.propose(image_of(request), labels)
        key = step_key(request.item_id, "propose")
        store.put(key, proposal.to_bytes(), content_type="application/json")
        return {"concepts_key": key, "phrases": len(proposal.phrases),
                "hard_negatives": len(proposal.hard_negatives)}

    return handle
