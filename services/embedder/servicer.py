"""gRPC ``dataengine.v1.Embedder``: converts the request, calls the core, converts the reply."""

from __future__ import annotations

import grpc

from services.common.errors import InvalidInput
from services.common.grpc_server import rpc
from services.common.pb import embedder_pb2, embedder_pb2_grpc
from services.embedder.core import EmbedderCore
from services.common.image_source import ImageSource
from services.embedder.types import DEFAULT_CROP_OVERLAP_RATIO, check_crop_params

SERVICE_NAME = embedder_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name


class EmbedderServicer(embedder_pb2_grpc.EmbedderServicer):
    def __init__(self, core: EmbedderCore) -> None:
        self.core = core

    @rpc
    def Embed(self, request: embedder_pb2.EmbedRequest, context: grpc.ServicerContext) -> embedder_pb2.EmbedResponse:
        if not request.images:
            raise InvalidInput("EmbedRequest has no images")
        overlap = (request.crop_overlap_ratio if request.HasField("crop_overlap_ratio")
                   else DEFAULT_CROP_OVERLAP_RATIO)
        check_crop_params(request.crop_n_layers, overlap)  # before any image is read
        sources = [ImageSource.from_proto(ref, i) for i, ref in enumerate(request.images)]
        results = self.core.embed(sources, request.crop_n_layers, overlap)
        return embedder_pb2.EmbedResponse(images=[r.to_proto() for r in results])


def add_to_server(server: grpc.Server, core: EmbedderCore) -> list[str]:
    """Register the Embedder servicer; returns the full service names (for health and reflection)."""
    embedder_pb2_grpc.add_EmbedderServicer_to_server(EmbedderServicer(core), server)
    return [SERVICE_NAME]
