"""Container health check: exit 0 when the gRPC server on 127.0.0.1:PORT answers SERVING.

Compose runs it as the services' healthcheck (the images have no grpc_health_probe binary);
Kubernetes uses its native ``grpc:`` probe against the same standard health service instead.
(Not named grpc_health.py: the script's folder comes first on sys.path and would shadow the
``grpc_health`` package.)

    python /opt/dataengine/healthcheck.py PORT [SERVICE]    # SERVICE "" = the whole server
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(port: int, service: str = "", host: str = "127.0.0.1", timeout_s: float = 3.0) -> str:
    """The health status name ("SERVING", "NOT_SERVING", ...) or the gRPC error code name."""
    with grpc.insecure_channel(f"{host}:{port}") as channel:
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
