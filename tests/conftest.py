"""Session fixtures: real redis-server and S3 server, tiny SAM checkpoints with random weights."""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path

import pytest

from services.common.sam_models import LoadedSam, load_sam, save_random_checkpoint
from services.common.settings import Settings
from services.common.storage import LocalStore, MinioStore
from tests.servers import redis_server, s3_server

S3_KEY, S3_SECRET = "testing", "testing-secret"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


_DBS = itertools.count(1)


@pytest.fixture
def broker(redis_url) -> str:
    """A Redis database of its own for this test: no queued message or index outlives the test."""
    return f"{redis_url.rsplit('/', 1)[0]}/{next(_DBS)}"


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def minio_store(s3_endpoint) -> MinioStore:
    """A fresh bucket on the S3 server, through the minio client."""
    return MinioStore(s3_endpoint, S3_KEY, S3_SECRET, bucket=f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def local_store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "bucket")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_random_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth", seed=0)


@pytest.fixture(scope="session")
def tiny_sam(tiny_checkpoint) -> LoadedSam:
    """The tiny SAM with random weights, loaded once (read-only in every test)."""
    return load_sam("tiny", tiny_checkpoint, "cpu")


@pytest.fixture
def settings(tmp_path, tiny_checkpoint) -> Settings:
    """Embedded-mode settings on the tiny model and a local store in tmp_path."""
    return Settings(store="local", store_root=tmp_path / "store", model_type="tiny",
                    checkpoint=tiny_checkpoint, device="cpu", embed_batch_size=2)
