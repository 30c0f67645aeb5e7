"""Container health check: exit 0 when the gRPC server on 127.0.0.1:PORT answers SERVING.

Compose runs it as the services' healthcheck (the images have no grpc_health_probe binary);
Kubernetes uses its native ``grpc:`` probe against the same standard health service instead, and
this script as an ``exec`` probe once the servers speak TLS (native gRPC probes cannot). It speaks
TLS as the settings say (DATAENGINE_TLS_*: the pod's own certificate is its client certificate
under mTLS), to ``localhost``, so server certificates carry ``localhost`` among their names.
(Not named grpc_health.py: the script's folder comes first on sys.path and would shadow the
``grpc_health`` package.)

    python /opt/dataengine/healthcheck.py PORT [SERVICE]    # SERVICE "" = the whole server
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.grpc_server import client_channel
from services.common.settings import get_settings
from services.common.tls import TlsFiles


def check(port: int, service: str = "", host: str = "localhost", timeout_s: float = 3.0) -> str:
    """The health status name ("SERVING", "NOT_SERVING", ...) or the gRPC error code name."""
    settings = get_settings()
    with client_channel(f"{host}:{port}", settings.max_message_bytes, tls=TlsFiles.from_settings(settings)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or not argv[1].isdigit():
        print("usage: healthcheck.py PORT [SERVICE]", file=sys.stderr)
        return 2
    status = check(int(argv[1]), argv[2] if len(argv) == 3 else "")
    if status != "SERVING":
        print(f"gRPC health on port {argv[1]}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
