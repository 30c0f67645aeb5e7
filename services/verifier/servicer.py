"""gRPC ``dataengine.v1.Verifier``: converts the request, calls the core, converts the reply."""

from __future__ import annotations

import grpc

from services.common.errors import InvalidInput
from services.common.grpc_server import rpc
from services.common.masks import MaskRecord
from services.common.pb import verifier_pb2, verifier_pb2_grpc
from services.common.image_source import ImageSource
from services.verifier.core import PhrasePair, VerifierCore, union_of_masks

SERVICE_NAME = verifier_pb2.DESCRIPTOR.services_by_name["Verifier"].full_name


class VerifierServicer(verifier_pb2_grpc.VerifierServicer):
    def __init__(self, core: VerifierCore) -> None:
        self.core = core

    @rpc
    def Verify(self, request: verifier_pb2.VerifyRequest, context: grpc.ServicerContext) -> verifier_pb2.VerifyResponse:
        # Required even by backends that ignore pixels, so a client works with every backend.
        if not request.HasField("image"):
            raise InvalidInput("VerifyRequest has no image")
        if not request.pairs:
            raise InvalidInput("VerifyRequest has no pairs")
        pairs = [PhrasePair(p.phrase, [MaskRecord.from_proto(m) for m in p.masks], p.is_negative)
                 for p in request.pairs]
        verification = self.core.verify(pairs, union_of_masks(pairs), list(request.checks),
                                        image=ImageSource.from_proto(request.image))
        return verification.to_proto()


def add_to_server(server: grpc.Server, core: VerifierCore) -> list[str]:
    """Register the Verifier servicer; returns the full service names (for health and reflection)."""
    verifier_pb2_grpc.add_VerifierServicer_to_server(VerifierServicer(core), server)
    return [SERVICE_NAME]
