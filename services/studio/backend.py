"""The one interface the studio's HTTP handlers use, and its gRPC implementation.

In a deployment the studio is a client of the orchestrator (review queue, leases, submissions) and
the decoder (``Predict`` on the cached embedding), and reads images from the object store. The
in-process implementation over the embedded engine's cores (``dataengine studio OUT_DIR``) lives at
the top, in ``services/app/studio_local.py``: a service never imports another service.

Items travel as ``orchestrator_pb2.Item`` either way (the in-process side converts its items with
the same ``to_proto`` the servicer uses), so one converter makes the page's view.
"""

from __future__ import annotations

import time
from typing import Protocol

import grpc

from services.common.errors import NotFound, error_from_rpc
from services.common.grpc_server import client_channel
from services.common.pb import decoder_pb2, decoder_pb2_grpc, orchestrator_pb2 as pb, orchestrator_pb2_grpc
from services.common.review import AnnotatorFigures, Lease, ReviewSubmission
from services.common.storage import ObjectStore
from services.common.tls import PLAINTEXT, TlsFiles
from services.studio.identity import Caller

RPC_TIMEOUT_S = 30.0


class StudioBackend(Protocol):
    """What the studio needs; every method raises the domain errors (services.common.errors).
    ``caller`` is the signed-in annotator: their name acts in the review, their token (if any)
    goes with the call."""

    store: ObjectStore

    def next_item(self, caller: Caller) -> pb.Item | None: ...
    def get_item(self, caller: Caller, item_id: str) -> pb.Item: ...
    def heartbeat(self, caller: Caller, item_id: str, token: str) -> Lease: ...
    def release(self, caller: Caller, item_id: str, token: str) -> None: ...
    def submit(self, caller: Caller, submission: ReviewSubmission) -> pb.Item: ...
    def waiting(self, caller: Caller) -> dict[str, int]: ...
    def figures(self, caller: Caller) -> list[AnnotatorFigures]: ...

    def predict(self, caller: Caller,
                request: decoder_pb2.PredictRequest) -> tuple[decoder_pb2.PredictResponse, dict[str, float]]:
        """The decoder's answer and the seconds it spent, by part ("decoder", "masks", ... or "rpc")."""


class GrpcBackend:
    """Over the orchestrator's and the decoder's gRPC servers, and the object store. Each call
    carries the caller's token, so the servers check the annotator themselves."""

    def __init__(self, orchestrator_address: str, decoder_address: str, store: ObjectStore,
                 max_message_bytes: int, tls: TlsFiles = PLAINTEXT) -> None:
        self._channels = [client_channel(orchestrator_address, max_message_bytes, tls=tls),
                          client_channel(decoder_address, max_message_bytes, tls=tls)]
        self.orchestrator = orchestrator_pb2_grpc.OrchestratorStub(self._channels[0])
        self.decoder = decoder_pb2_grpc.DecoderStub(self._channels[1])
        self.store = store

    @staticmethod
    def _call(method, request, caller: Caller):
        metadata = (("authorization", f"Bearer {caller.token}"),) if caller.token else None
        try:
            return method(request, timeout=RPC_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def next_item(self, caller: Caller) -> pb.Item | None:
        try:
            return self._call(self.orchestrator.NextReview, pb.NextReviewRequest(annotator=caller.name), caller)
        except NotFound:
            return None

    def get_item(self, caller: Caller, item_id: str) -> pb.Item:
        return self._call(self.orchestrator.GetItem, pb.GetItemRequest(item_id=item_id), caller)

    def heartbeat(self, caller: Caller, item_id: str, token: str) -> Lease:
        return Lease.from_proto(self._call(self.orchestrator.Heartbeat, pb.LeaseRequest(
            item_id=item_id, annotator=caller.name, lease_token=token), caller))

    def release(self, caller: Caller, item_id: str, token: str) -> None:
        self._call(self.orchestrator.ReleaseReview, pb.LeaseRequest(item_id=item_id, annotator=caller.name,
                                                                    lease_token=token), caller)

    def submit(self, caller: Caller, submission: ReviewSubmission) -> pb.Item:
        return self._call(self.orchestrator.SubmitReview, submission.to_proto(), caller)

    def waiting(self, caller: Caller) -> dict[str, int]:
        reply = self._call(self.orchestrator.Stats, pb.StatsRequest(), caller)
        return {c.key: c.count for c in reply.review_waiting}

    def figures(self, caller: Caller) -> list[AnnotatorFigures]:
        reply = self._call(self.orchestrator.AnnotatorStats, pb.AnnotatorStatsRequest(), caller)
        return [AnnotatorFigures.from_proto(f) for f in reply.annotators]

    def predict(self, caller: Caller,
                request: decoder_pb2.PredictRequest) -> tuple[decoder_pb2.PredictResponse, dict[str, float]]:
        start = time.perf_counter()
        reply = self._call(self.decoder.Predict, request, caller)
        return reply, {"rpc": time.perf_counter() - start}

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
