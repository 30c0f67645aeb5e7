"""fetch_checkpoint against a real HTTP server on loopback: download + SHA-256 check, skip when
present, wrong hash deleted, unreachable URL explained."""

from __future__ import annotations

import functools
import hashlib
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from services.common.errors import InvalidInput
from services.common.sam_models import OFFICIAL_CHECKPOINTS
from services.embedder.weights import CheckpointDownloadError, fetch_checkpoint
from tests.servers import free_port

PAYLOAD = bytes(range(256)) * 5000  # 1.28 MB: more than one read chunk
SHA = hashlib.sha256(PAYLOAD).hexdigest()
FILENAME = OFFICIAL_CHECKPOINTS["vit_b"].filename


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def http_url(tmp_path_factory):
    """Base URL of an HTTP server on 127.0.0.1 serving a folder that holds ckpt.pth."""
    root = tmp_path_factory.mktemp("http")
    (root / "ckpt.pth").write_bytes(PAYLOAD)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != FILENAME)


def test_downloads_verifies_and_then_skips(http_url, tmp_path):
    seen = []
    path = fetch_checkpoint("vit_b", tmp_path / "models", url=f"{http_url}/ckpt.pth", sha256=SHA,
                            progress=lambda done, total: seen.append((done, total)))
    assert path == tmp_path / "models" / FILENAME and path.read_bytes() == PAYLOAD
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD)) and _leftovers(path.parent) == []
    # Already there with the right hash: nothing is downloaded (the URL would not even answer).
    again = fetch_checkpoint("vit_b", tmp_path / "models", url=f"http://127.0.0.1:{free_port()}/x", sha256=SHA)
    assert again == path


def test_wrong_hash_deletes_the_download_and_names_both_hashes(http_url, tmp_path):
    wrong = "0" * 64
    with pytest.raises(CheckpointDownloadError) as err:
        fetch_checkpoint("vit_b", tmp_path, url=f"{http_url}/ckpt.pth", sha256=wrong)
    assert f"SHA-256 is {SHA}, expected {wrong}" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no partial or unverified file is left


def test_a_corrupt_existing_file_is_replaced(http_url, tmp_path):
    (tmp_path / FILENAME).write_bytes(b"half a download")
    path = fetch_checkpoint("vit_b", tmp_path, url=f"{http_url}/ckpt.pth", sha256=SHA)
    assert path.read_bytes() == PAYLOAD


@pytest.mark.parametrize("url_of, reason", [
    (lambda base: f"http://127.0.0.1:{free_port()}/ckpt.pth", "Connection refused"),  # nothing listens
    (lambda base: f"{base}/missing.pth", "404"),
])
def test_unreachable_url_says_what_to_do(http_url, tmp_path, url_of, reason):
    url = url_of(http_url)
    with pytest.raises(CheckpointDownloadError) as err:
        fetch_checkpoint("vit_b", tmp_path, url=url, sha256=SHA, timeout=5)
    message = str(err.value)
    assert message.startswith(f"cannot download {url}: ") and reason in message
    assert message.endswith("download it elsewhere and pass --checkpoint PATH")
    assert list(tmp_path.iterdir()) == []


def test_unknown_name_lists_the_choices(tmp_path):
    with pytest.raises(InvalidInput, match=r"no official checkpoint named 'vit_x'.*'vit_b'"):
        fetch_checkpoint("vit_x", tmp_path)
