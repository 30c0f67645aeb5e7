"""gRPC plumbing every server shares: message limits, health, reflection, error mapping,
graceful shutdown on SIGTERM."""

from __future__ import annotations

import functools
import logging
import signal
import threading
from concurrent import futures
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.errors import DataEngineError

log = logging.getLogger(__name__)


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Send/receive limits; clients and servers use the same ones."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


MAX_DETAILS_CHARS = 2000  # gRPC trailers are limited (8 KiB by default): a longer message is cut


def _details(message: str) -> str:
    return message if len(message) <= MAX_DETAILS_CHARS else message[:MAX_DETAILS_CHARS] + " ... (cut)"


class _Undecodable:
    """What a request that is not its message type decodes to; the handler answers for it."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.type_name, self.error = type_name, error


class InvalidMessages(grpc.ServerInterceptor):
    """Bytes that are not the method's request message are INVALID_ARGUMENT naming the type, not
    grpcio's INTERNAL "Exception deserializing request!"."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        decode, behaviour = handler.request_deserializer, handler.unary_unary
        owner = getattr(decode, "__self__", None)
        type_name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")

        def safe_decode(data: bytes):
            try:
                return decode(data)
            except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others
                return _Undecodable(type_name, exc)

        def run(request, context):
            if isinstance(request, _Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              _details(f"the request to {handler_call_details.method} is not a serialized "
                                       f"{request.type_name} message: {request.error}"))
            return behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(run, request_deserializer=safe_decode,
                                                   response_serializer=handler.response_serializer)


def rpc(method: Callable) -> Callable:
    """Servicer-method decorator: domain errors become their gRPC status with the message as details;
    anything else is logged and answered INTERNAL, and the server keeps serving."""

    @functools.wraps(method)
    def wrapper(self, request, context: grpc.ServicerContext):
        try:
            return method(self, request, context)
        except DataEngineError as exc:
            log.info("rejected", extra={"rpc": method.__name__, "code": exc.code.name})
            context.abort(exc.code, _details(str(exc)))
        except Exception as exc:  # noqa: BLE001 - the server must survive any request
            log.exception("rpc failed", extra={"rpc": method.__name__})
            context.abort(grpc.StatusCode.INTERNAL, _details(f"{type(exc).__name__}: {exc}"))

    return wrapper


def build_server(add_servicers: Callable[[grpc.Server], list[str]], address: str,
                 max_message_bytes: int, workers: int = 4) -> tuple[grpc.Server, int]:
    """A started-ready server on ``address`` ("host:port"; port 0 picks one).

    ``add_servicers`` registers the service's servicers and returns their full names
    (e.g. ``"dataengine.v1.Embedder"``). Returns the server and the bound port.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=channel_options(max_message_bytes), interceptors=[InvalidMessages()])
    names = add_servicers(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC server to {address}")
    server._dataengine_health = health_servicer  # type: ignore[attr-defined]  # for shutdown
    return server, port


def serve_until_signal(server: grpc.Server, grace_s: float, stop: threading.Event | None = None) -> None:
    """Start ``server`` and block until SIGTERM/SIGINT (or ``stop``), then drain for ``grace_s``."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    server.start()
    stop.wait()
    health_servicer = getattr(server, "_dataengine_health", None)
    if health_servicer is not None:
        health_servicer.enter_graceful_shutdown()  # probes see NOT_SERVING while we drain
    server.stop(grace_s).wait()
