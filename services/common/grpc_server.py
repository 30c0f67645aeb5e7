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

from services.common.auth import OPEN_PREFIXES, TokenFile, authorize, reset_principal, set_principal
from services.common.errors import DataEngineError
from services.common.metrics import GrpcMetrics
from services.common.tls import PLAINTEXT, TlsFiles

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


def _refusal(code: grpc.StatusCode, message: str):
    def refuse(request, context):
        context.abort(code, _details(message))

    return grpc.unary_unary_rpc_method_handler(refuse)


class AuthInterceptor(grpc.ServerInterceptor):
    """Every call but health and reflection needs a token whose role may call the method
    (services.common.auth); the servicer then sees the caller as ``current_principal()``."""

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        try:
            principal = authorize(self.tokens, metadata.get("authorization"), method)
        except DataEngineError as exc:
            log.info("refused", extra={"rpc": method, "code": exc.code.name})
            return _refusal(exc.code, str(exc))
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behaviour = handler.unary_unary

        def run(request, context):
            token = set_principal(principal)
            try:
                return behaviour(request, context)
            finally:
                reset_principal(token)

        return grpc.unary_unary_rpc_method_handler(run, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


class _BearerToken(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        details = client_call_details._replace(metadata=tuple(client_call_details.metadata or ()) + self.metadata)
        return continuation(details, request)


def client_channel(target: str, max_message_bytes: int, token: str = "", tls: TlsFiles = PLAINTEXT) -> grpc.Channel:
    """A channel to one of our servers that sends ``token`` (DATAENGINE_AUTH_TOKEN) with every call,
    over TLS when ``tls`` has a CA or a certificate (services.common.tls)."""
    options = channel_options(max_message_bytes)
    channel = (grpc.secure_channel(target, tls.channel_credentials(), options=options) if tls.client_enabled
               else grpc.insecure_channel(target, options=options))
    return grpc.intercept_channel(channel, _BearerToken(token)) if token else channel


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
                 max_message_bytes: int, workers: int = 4, tokens: TokenFile | None = None,
                 tls: TlsFiles = PLAINTEXT, reflection_on: bool = True,
                 metrics: bool = True) -> tuple[grpc.Server, int]:
    """A started-ready server on ``address`` ("host:port"; port 0 picks one).

    ``add_servicers`` registers the service's servicers and returns their full names
    (e.g. ``"dataengine.v1.Embedder"``). ``tokens``: who may call what (None: anyone, everything).
    ``tls``: the port speaks only TLS when it has a certificate (plaintext otherwise).
    ``reflection_on``: serve the reflection service (DATAENGINE_GRPC_REFLECTION). ``metrics``: count
    and time every RPC (``GrpcMetrics``; off where nothing serves /metrics).
    Returns the server and the bound port.
    """
    # metrics first: refusals by the others are counted too
    interceptors = [*([GrpcMetrics()] if metrics else []), *([AuthInterceptor(tokens)] if tokens is not None else []),
                    InvalidMessages()]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=channel_options(max_message_bytes), interceptors=interceptors)
    names = add_servicers(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if reflection_on:
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    port = (server.add_secure_port(address, tls.server_credentials()) if tls.server_enabled
            else server.add_insecure_port(address))
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
