"""Transport security of every gRPC server and client, and of the studio's HTTP server.

One set of PEM files per process, from the settings (``DATAENGINE_TLS_*``):

- ``cert_file`` + ``key_file``: this process's certificate chain and private key. A server
  presents them; a client presents them as its client certificate (mTLS).
- ``ca_file``: the CA bundle that certificates of the other side must chain to. A client checks the
  server against it (without one: the system's roots); a server checks client certificates.
- ``client_auth``: ``none`` (any client may connect over TLS), ``optional`` (a client certificate,
  when sent, must chain to ``ca_file``), ``require`` (mTLS: no valid client certificate, no
  connection; the TLS handshake fails before any RPC, so a plaintext client or one whose
  certificate comes from another CA is refused at the transport).

A server speaks TLS when it has a certificate; a client when it has a CA or a certificate. Without
any of them everything is plaintext, as in the embedded mode and the tests.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import grpc

from services.common.errors import InvalidInput

if TYPE_CHECKING:
    from services.common.settings import Settings

ClientAuth = Literal["none", "optional", "require"]


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise InvalidInput(f"{what} {path} holds no PEM block (-----BEGIN ...)")
    return data


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of one process; see the module docstring."""

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    client_auth: ClientAuth = "none"

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise InvalidInput("DATAENGINE_TLS_CERT_FILE and DATAENGINE_TLS_KEY_FILE go together: set both or neither")
        if self.client_auth != "none" and (self.cert_file is None or self.ca_file is None):
            raise InvalidInput(f"DATAENGINE_TLS_CLIENT_AUTH={self.client_auth} needs DATAENGINE_TLS_CERT_FILE, "
                               "_KEY_FILE and _CA_FILE (the CA that client certificates must chain to)")

    @classmethod
    def from_settings(cls, settings: "Settings") -> "TlsFiles":
        return cls(settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file, settings.tls_client_auth)

    @property
    def server_enabled(self) -> bool:
        return self.cert_file is not None

    @property
    def client_enabled(self) -> bool:
        return self.cert_file is not None or self.ca_file is not None

    def _own_pair(self) -> tuple[bytes | None, bytes | None]:
        return _read(self.key_file, "DATAENGINE_TLS_KEY_FILE"), _read(self.cert_file, "DATAENGINE_TLS_CERT_FILE")

    def server_credentials(self) -> grpc.ServerCredentials:
        """For ``server.add_secure_port``; only when ``server_enabled``."""
        key, cert = self._own_pair()
        ca = _read(self.ca_file, "DATAENGINE_TLS_CA_FILE") if self.client_auth != "none" else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=self.client_auth == "require")

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """For ``grpc.secure_channel``: the server checked against ``ca_file`` (or the system's
        roots), our certificate sent when we have one."""
        key, cert = self._own_pair()
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca_file, "DATAENGINE_TLS_CA_FILE"),
                                            private_key=key, certificate_chain=cert)

    def uvicorn_options(self) -> dict:
        """uvicorn.Config / uvicorn.run keyword arguments serving HTTPS (nothing without a certificate)."""
        if not self.server_enabled:
            return {}
        self._own_pair()  # a missing or non-PEM file is named here, not deep inside ssl
        options = {"ssl_certfile": str(self.cert_file), "ssl_keyfile": str(self.key_file)}
        if self.client_auth != "none":
            options |= {"ssl_ca_certs": str(self.ca_file),
                        "ssl_cert_reqs": ssl.CERT_REQUIRED if self.client_auth == "require" else ssl.CERT_OPTIONAL}
        return options


PLAINTEXT = TlsFiles()
