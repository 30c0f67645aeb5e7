"""TLS and mTLS (issue 13) with certificates the tests make: real gRPC servers over loopback, the
health probe script, the CLI in its own process and the studio's HTTPS server.

A TLS failure happens in the handshake, before any RPC: the client sees UNAVAILABLE (grpcio gives
no finer code), so each refusal is checked against the same call succeeding with the right files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.auth import digest
from services.common.grpc_server import build_server, client_channel
from services.common.pb import common_pb2, concepts_pb2, concepts_pb2_grpc
from services.common.settings import Settings
from services.common.tls import PLAINTEXT, TlsFiles
from services.concepts.core import ConceptsCore
from services.concepts.servicer import add_to_server as add_concepts
from tests.certs import make_pki
from tests.common.image_cases import png
from tests.servers import grpc_loopback

HEALTH_SCRIPT = "deploy/docker/healthcheck.py"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def health(channel) -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def refused(channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        health(channel)
    return err.value.code()


@pytest.fixture(scope="module")
def mtls_server(pki):
    server, port = build_server(lambda s: [], "127.0.0.1:0", 4 << 20, workers=2, tls=pki["server"])
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0).wait()


def test_mtls_serves_a_client_of_our_ca(pki, mtls_server):
    with client_channel(mtls_server, 4 << 20, tls=pki["client"]) as channel:
        assert health(channel) == "SERVING"


@pytest.mark.parametrize("who", ["plaintext", "stranger", "no client certificate", "server unchecked"])
def test_mtls_refuses(pki, mtls_server, who):
    ca = pki["ca"].cert_file
    tls = {"plaintext": PLAINTEXT, "stranger": pki["stranger"],  # a client certificate from another CA
           "no client certificate": TlsFiles(ca_file=ca),
           # a client trusting only the other CA refuses our server's certificate
           "server unchecked": TlsFiles(pki["client"].cert_file, pki["client"].key_file, pki["stranger"].ca_file)}[who]
    with client_channel(mtls_server, 4 << 20, tls=tls) as channel:
        assert refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_tls_without_client_auth_serves_any_client_that_trusts_the_server(pki):
    server_tls = TlsFiles(pki["server"].cert_file, pki["server"].key_file)
    with grpc_loopback(lambda s: [], 4 << 20, tls=server_tls, client_tls=TlsFiles(ca_file=pki["ca"].cert_file)) as (channel, address):
        assert health(channel) == "SERVING"
        with client_channel(address, 4 << 20) as plain:
            assert refused(plain) == grpc.StatusCode.UNAVAILABLE  # the port speaks TLS only


def test_tokens_and_roles_over_mtls(pki, tmp_path, local_store):
    """A real servicer behind mTLS and tokens: the certificate opens the connection, the token the RPC."""
    from services.common.auth import TokenFile

    (tmp_path / "tokens.json").write_text(json.dumps([{"sha256": digest("olga-secret"), "principal": "olga",
                                                       "role": "operator"}]))
    core = ConceptsCore("ontology", local_store, 10**6, Settings())
    request = concepts_pb2.ProposeRequest(image=common_pb2.ImageRef(data=png(20, 30)), known_labels=["dog"])
    with grpc_loopback(lambda s: add_concepts(s, core), 4 << 20, tokens=TokenFile(tmp_path / "tokens.json"),
                       tls=pki["server"], client_tls=pki["client"]) as (channel, address):
        with pytest.raises(grpc.RpcError) as err:
            concepts_pb2_grpc.ConceptsStub(channel).Propose(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with client_channel(address, 4 << 20, "olga-secret", pki["client"]) as signed:
            reply = concepts_pb2_grpc.ConceptsStub(signed).Propose(request, timeout=30)
        assert [p.text for p in reply.phrases] == ["dog"]


def _env(tls: TlsFiles) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAENGINE_")}
    for name in ("cert_file", "key_file", "ca_file"):
        if getattr(tls, name) is not None:
            env[f"DATAENGINE_TLS_{name.upper()}"] = str(getattr(tls, name))
    return env


def test_the_probe_script_speaks_tls_from_the_settings(pki, mtls_server):
    port = mtls_server.rsplit(":", 1)[1]

    def probe(tls: TlsFiles) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, HEALTH_SCRIPT, port], env=_env(tls), capture_output=True,
                              text=True, timeout=60)

    assert probe(pki["client"]).returncode == 0
    plain = probe(PLAINTEXT)
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr


def test_the_cli_speaks_tls_from_the_settings(pki, mtls_server):
    """``dataengine status`` against a server that requires mTLS: refused in plaintext, served with
    the files (the server has no orchestrator: UNIMPLEMENTED proves the RPC got through)."""
    def status(tls: TlsFiles) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.app.cli", "status", "--address", mtls_server],
                              env=_env(tls), capture_output=True, text=True, timeout=120)

    plain = status(PLAINTEXT)
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr + plain.stdout
    served = status(pki["client"])
    assert served.returncode == 1 and "UNIMPLEMENTED" in served.stderr + served.stdout


@pytest.mark.parametrize("fields, message", [
    ({"tls_cert_file": "/x.crt"}, "go together"),
    ({"tls_client_auth": "require"}, "needs DATAENGINE_TLS_CERT_FILE"),
])
def test_incomplete_tls_settings_are_refused_at_start(fields, message):
    with pytest.raises(ValueError, match=message):
        Settings(**fields)


def test_a_file_that_is_not_pem_is_named(tmp_path):
    (tmp_path / "c.crt").write_text("not a certificate")
    with pytest.raises(ValueError, match=r"DATAENGINE_TLS_KEY_FILE .*c.crt holds no PEM"):
        TlsFiles(tmp_path / "c.crt", tmp_path / "c.crt").server_credentials()
    with pytest.raises(ValueError, match="No such file"):
        TlsFiles(ca_file=tmp_path / "missing.crt").channel_credentials()
