"""Session fixtures: real redis-server and S3 server, tiny SAM checkpoints with random weights."""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path

import pytest

from services.common.sam_models import LoadedSam, load_sam, save_random_checkpoint
from services.common.settings import Settings
from services.common.storage import LocalStore, MinioStore
from tests.openai_stub import OpenAIStub
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


# The model backends of the concepts and verifier services: a loopback OpenAI-compatible endpoint
# per test and a tiny random Qwen2.5-VL saved once per session.
@pytest.fixture
def openai_stub() -> OpenAIStub:
    """A fresh scripted endpoint (nothing queued, nothing seen)."""
    with OpenAIStub() as stub:
        yield stub


@pytest.fixture(scope="session")
def tiny_mllm_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL and its processor, written with save_pretrained (read-only)."""
    from tests.mllm_models import save_tiny_qwen2_5_vl  # transformers loads only where it is needed

    return save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2.5-vl"), seed=0)


@pytest.fixture(scope="session")
def tiny_mllm(tiny_mllm_dir):
    """That model loaded once through from_pretrained, on the CPU."""
    from services.common.mllm.local import LocalModel

    return LocalModel.load(tiny_mllm_dir, "cpu", timeout_s=120.0)
