"""gRPC ``dataengine.v1.Concepts``: converts the request, calls the core, converts the reply."""

from __future__ import annotations

import grpc

from services.common.errors import InvalidInput
from services.common.grpc_server import rpc
from services.common.pb import concepts_pb2, concepts_pb2_grpc
from services.concepts.core import ConceptsCore
from services.common.image_source import ImageSource

SERVICE_NAME = concepts_pb2.DESCRIPTOR.services_by_name["Concepts"].full_name


class ConceptsServicer(concepts_pb2_grpc.ConceptsServicer):
    def __init__(self, core: ConceptsCore) -> None:
        self.core = core

    @rpc
    def Propose(self, request: concepts_pb2.ProposeRequest,
                context: grpc.ServicerContext) -> concepts_pb2.ProposeResponse:
        # Required even by backends that ignore pixels, so a client works with every backend.
        if not request.HasField("image"):
            raise InvalidInput("ProposeRequest has no image")
        proposal = self.core.propose(ImageSource.from_proto(request.image), list(request.known_labels),
                                     request.max_positives, request.max_negatives, backend=request.backend)
        return proposal.to_proto()


def add_to_server(server: grpc.Server, core: ConceptsCore) -> list[str]:
    """Register the Concepts servicer; returns the full service names (for health and reflection)."""
    concepts_pb2_grpc.add_ConceptsServicer_to_server(ConceptsServicer(core), server)
    return [SERVICE_NAME]
