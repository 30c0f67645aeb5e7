"""Serving the studio: uvicorn over the app, and the gRPC backend of a deployment."""

from __future__ import annotations

import signal

import uvicorn

from services.common.auth import TokenFile
from services.common.logs import setup_logging
from services.common.settings import Settings
from services.common.storage import open_store
from services.common.tls import TlsFiles
from services.studio.app import create_app
from services.studio.backend import GrpcBackend, StudioBackend


def grpc_backend(settings: Settings) -> GrpcBackend:
    """The deployment's backend: DATAENGINE_ORCHESTRATOR_ADDRESS, DATAENGINE_DECODER_ADDRESS, the store,
    over TLS when DATAENGINE_TLS_* say so."""
    return GrpcBackend(settings.orchestrator_address, settings.decoder_address, open_store(settings),
                       settings.max_message_bytes, TlsFiles.from_settings(settings))


def serve(backend: StudioBackend, settings: Settings, host: str | None = None, port: int | None = None,
          tokens: TokenFile | None = None) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn finishes the requests in flight, then returns).
    ``tokens``: annotators sign in by token (None: by name). HTTPS when DATAENGINE_TLS_CERT_FILE is set."""
    setup_logging(settings.log_level)
    app = create_app(backend, settings.review_lease_s, tokens)
    # uvicorn drains, restores the handlers it found and raises the signal again: with these the
    # process then ends with status 0, as the other services do after a graceful stop.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=host or settings.host, port=port if port is not None else settings.studio_port,
                log_level=settings.log_level.lower(), access_log=False,
                timeout_graceful_shutdown=int(settings.shutdown_grace_s), **TlsFiles.from_settings(settings).uvicorn_options())
