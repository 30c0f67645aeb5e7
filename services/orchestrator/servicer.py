"""gRPC ``dataengine.v1.Orchestrator``: converts requests, calls the engine, converts replies."""

from __future__ import annotations

import grpc

from services.common.auth import acting_as
from services.common.errors import InvalidInput, NotFound
from services.common.grpc_server import rpc
from services.common.pb import orchestrator_pb2, orchestrator_pb2_grpc
from services.common.review import ReviewSubmission
from services.orchestrator import exports
from services.common.image_source import ImageSource
from services.orchestrator.engine import Orchestrator
from services.orchestrator.model import ItemState, Stage

SERVICE_NAME = orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, core: Orchestrator) -> None:
        self.core = core

    def _item(self, item, lease=None) -> orchestrator_pb2.Item:
        return item.to_proto(self.core.grid_masks(item), lease)

    @rpc
    def Submit(self, request, context) -> orchestrator_pb2.SubmitResponse:
        images = [ImageSource.from_proto(ref, i) for i, ref in enumerate(request.images)]
        ids = self.core.submit(images, list(request.known_labels), Stage.parse(request.stage))
        return orchestrator_pb2.SubmitResponse(item_ids=ids)

    @rpc
    def GetItem(self, request, context) -> orchestrator_pb2.Item:
        _need_item(request.item_id)
        return self._item(self.core.load(request.item_id))

    @rpc
    def ListItems(self, request, context) -> orchestrator_pb2.ListItemsResponse:
        state = ItemState.parse(request.state) if request.state else None
        stage = Stage.parse(request.stage) if request.stage else None
        items, token = self.core.list_items(state, stage, request.page_size or 100, request.page_token)
        # Listings carry no grid masks (they can be thousands per item): GetItem has them.
        return orchestrator_pb2.ListItemsResponse(items=[i.to_proto() for i in items], next_page_token=token)

    @rpc
    def Stats(self, request, context) -> orchestrator_pb2.StatsResponse:
        return self.core.stats().to_proto()

    @rpc
    def NextReview(self, request, context) -> orchestrator_pb2.Item:
        item = self.core.next_review(acting_as(request.annotator), Stage.parse(request.stage) if request.stage else None)
        if item is None:
            raise NotFound("no item is waiting for review")
        return self._item(item, item.lease)

    @rpc
    def SubmitReview(self, request, context) -> orchestrator_pb2.Item:
        request.annotator = acting_as(request.annotator)  # the token's principal where auth is on
        return self._item(self.core.submit_review(ReviewSubmission.from_proto(request)))

    @rpc
    def Heartbeat(self, request, context) -> orchestrator_pb2.Lease:
        _need_item(request.item_id)
        return self.core.desk.heartbeat(request.item_id, acting_as(request.annotator), request.lease_token).to_proto()

    @rpc
    def ReleaseReview(self, request, context) -> orchestrator_pb2.Item:
        _need_item(request.item_id)
        return self._item(self.core.desk.release(request.item_id, acting_as(request.annotator), request.lease_token))

    @rpc
    def AnnotatorStats(self, request, context) -> orchestrator_pb2.AnnotatorStatsResponse:
        return orchestrator_pb2.AnnotatorStatsResponse(annotators=[f.to_proto() for f in self.core.desk.figures()])

    @rpc
    def Export(self, request, context) -> orchestrator_pb2.ExportResponse:
        if not request.prefix:
            raise InvalidInput("export needs an object-store prefix to write under")
        keys, summary = exports.export_to_store(self.core.store, request.format, request.prefix,
                                                 exports.DATASET_STATES)
        return orchestrator_pb2.ExportResponse(keys=keys, items=summary.items)


def _need_item(item_id: str) -> None:
    if not item_id:
        raise InvalidInput("item_id is empty")


def add_to_server(server: grpc.Server, core: Orchestrator) -> list[str]:
    orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(OrchestratorServicer(core), server)
    return [SERVICE_NAME]
