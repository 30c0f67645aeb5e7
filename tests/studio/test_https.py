"""The studio over HTTPS, and under mTLS (issue 13), with certificates the tests make."""

from __future__ import annotations

import ssl

import httpx
import pytest

from services.common.tls import TlsFiles
from services.studio.app import create_app
from tests.certs import make_pki
from tests.servers import UvicornThread


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_the_studio_serves_https(pki, studio):
    app = create_app(studio.backend, 600.0, None)
    options = TlsFiles(pki["server"].cert_file, pki["server"].key_file).uvicorn_options()
    with UvicornThread(app, **options) as url:
        https = url.replace("http://", "https://")
        assert httpx.get(f"{https}/healthz", verify=ssl.create_default_context(cafile=pki["ca"].cert_file), timeout=10).status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{https}/healthz", verify=ssl.create_default_context(cafile=pki["stranger"].ca_file), timeout=10)  # not our CA
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/healthz", timeout=10)  # plaintext to a TLS port


def test_the_studio_requires_client_certificates_under_mtls(pki, studio):
    app = create_app(studio.backend, 600.0, None)
    with UvicornThread(app, **pki["server"].uvicorn_options()) as url:
        https, ca = url.replace("http://", "https://"), str(pki["ca"].cert_file)
        client = pki["client"]
        ok = httpx.get(f"{https}/healthz", verify=_context(ca, client), timeout=10)
        assert ok.status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{https}/healthz", verify=_context(ca, pki["stranger"]), timeout=10).raise_for_status()


def _context(ca: str, client: TlsFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(str(client.cert_file), str(client.key_file))
    return context


