"""gRPC Decoder service: converts messages, calls DecoderCore, converts back."""

from __future__ import annotations

import grpc

from services.common.grpc_server import rpc
from services.common.pb import decoder_pb2, decoder_pb2_grpc
from services.decoder.core import DecoderCore
from services.common.amg_params import AmgParams
from services.decoder.prompts import Prompt

SERVICE_NAME = decoder_pb2.DESCRIPTOR.services_by_name["Decoder"].full_name


class DecoderServicer(decoder_pb2_grpc.DecoderServicer):
    def __init__(self, core: DecoderCore) -> None:
        self.core = core

    @rpc
    def Predict(self, request: decoder_pb2.PredictRequest,
                context: grpc.ServicerContext) -> decoder_pb2.PredictResponse:
        return self.core.predict(Prompt.from_proto(request)).to_proto()

    @rpc
    def GenerateMasks(self, request: decoder_pb2.GenerateMasksRequest,
                      context: grpc.ServicerContext) -> decoder_pb2.GenerateMasksResponse:
        return self.core.generate(request.embedding_key, AmgParams.from_proto(request.params)).to_proto()


def add_to_server(server: grpc.Server, core: DecoderCore) -> list[str]:
    """Register the Decoder service on ``server``; returns its full name for health and reflection."""
    decoder_pb2_grpc.add_DecoderServicer_to_server(DecoderServicer(core), server)
    return [SERVICE_NAME]
