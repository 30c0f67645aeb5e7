"""The studio wired to cores in this process: ``dataengine studio OUT_DIR`` over the engine that
``dataengine run`` left in OUT_DIR (local store, in-memory index rebuilt from the manifests, the
decoder core answering clicks). It sits at the top, beside cli.py, because it joins two services'
cores; the studio itself knows only ``StudioBackend``.
"""

from __future__ import annotations

from pathlib import Path

from services.common.errors import FailedPrecondition, NotFound
from services.common.pb import decoder_pb2, orchestrator_pb2 as pb
from services.common.review import AnnotatorFigures, Lease, ReviewSubmission
from services.common.sam_models import LoadedSam, load_from_settings
from services.common.settings import Settings
from services.common.storage import LocalStore
from services.decoder.core import DecoderCore
from services.decoder.prompts import Prompt
from services.orchestrator.dispatch import InlineDispatcher
from services.app.embedded import STORE_DIR
from services.orchestrator.engine import Orchestrator
from services.orchestrator.index import MemoryIndex
from services.orchestrator.model import Item, Stage
from services.studio.identity import Caller


class InProcessBackend:
    """StudioBackend over an orchestrator and a decoder core in this process (the caller's name
    acts; there is no token to check: ``dataengine studio`` runs on a trusted machine)."""

    def __init__(self, orchestrator: Orchestrator, decoder: DecoderCore) -> None:
        self.orchestrator, self.decoder, self.store = orchestrator, decoder, orchestrator.store

    @staticmethod
    def _proto(item: Item, lease: Lease | None = None) -> pb.Item:
        return item.to_proto(None, lease)  # the page draws no grid masks

    def next_item(self, caller: Caller) -> pb.Item | None:
        item = self.orchestrator.next_review(caller.name)
        return None if item is None else self._proto(item, item.lease)

    def get_item(self, caller: Caller, item_id: str) -> pb.Item:
        return self._proto(self.orchestrator.load(item_id))

    def heartbeat(self, caller: Caller, item_id: str, token: str) -> Lease:
        return self.orchestrator.desk.heartbeat(item_id, caller.name, token)

    def release(self, caller: Caller, item_id: str, token: str) -> None:
        self.orchestrator.desk.release(item_id, caller.name, token)

    def submit(self, caller: Caller, submission: ReviewSubmission) -> pb.Item:
        return self._proto(self.orchestrator.submit_review(submission))

    def waiting(self, caller: Caller) -> dict[str, int]:
        return self.orchestrator.desk.waiting()

    def figures(self, caller: Caller) -> list[AnnotatorFigures]:
        return self.orchestrator.desk.figures()

    def predict(self, caller: Caller, request: decoder_pb2.PredictRequest) -> tuple[decoder_pb2.PredictResponse, dict[str, float]]:
        timings: dict[str, float] = {}
        result = self.decoder.predict(Prompt.from_proto(request), timings)
        return result.to_proto(), timings


def embedded_backend(settings: Settings, out_dir: Path, sam: LoadedSam | None = None) -> InProcessBackend:
    """The backend over ``out_dir/.dataengine``; ``settings`` name the SAM model the run used.

    ``NotFound`` when out_dir holds no run; ``FailedPrecondition`` when the queued items were
    embedded by another model than the one given (every click would be refused).
    """
    store_dir = Path(out_dir) / STORE_DIR
    if not store_dir.is_dir():
        raise NotFound(f"{out_dir} holds no engine store ({STORE_DIR}/): run dataengine run IMAGES --out {out_dir}")
    store = LocalStore(store_dir)
    sam = sam if sam is not None else load_from_settings(settings)
    decoder = DecoderCore(sam, store, settings.embedding_cache_size)
    orchestrator = Orchestrator.from_settings(settings, store, MemoryIndex(),
                                              InlineDispatcher({}, settings.max_attempts))
    orchestrator.rebuild_index()  # unfinished items stay as they are: `dataengine run` finishes them
    queued = [entry for stage in Stage for entry in orchestrator.index.free(stage, 0, 1)]
    for item_id, _ in queued[:1]:
        key = orchestrator.load(item_id).outputs.get("embed", "")
        if key and not key.startswith(f"embeddings/{decoder.encoder_id}/"):
            raise FailedPrecondition(
                f"the items in {out_dir} were embedded by {key.split('/')[1]}, not by the model given "
                f"({decoder.encoder_id}): pass the --model-type and --checkpoint of the run")
    return InProcessBackend(orchestrator, decoder)
