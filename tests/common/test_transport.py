"""Encrypted transport to the two stores: MinIO over HTTPS with a private CA, Redis over TLS
(``rediss://``) with a password, each a real server with certificates the tests make."""

from __future__ import annotations

import pytest
from celery.contrib.testing.worker import start_worker

from services.common.errors import FailedPrecondition, TransientError
from services.common.queues import TaskOutcome, create_celery
from services.common.settings import Settings
from services.common.storage import MinioStore, open_store
from services.concepts.core import ConceptsCore
from services.concepts.tasks import TASK_NAME, register_tasks
from services.orchestrator.index import RedisIndex
from tests.certs import Ca
from tests.common.image_cases import png
from tests.conftest import S3_KEY, S3_SECRET
from tests.servers import redis_server, s3_server


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Our CA and a server certificate it signed (localhost, 127.0.0.1)."""
    folder = tmp_path_factory.mktemp("pki")
    ca = Ca.create(folder, "stores-ca")
    return ca, ca.tls_files(folder, "server")


def test_minio_over_https_with_the_private_ca(pki):
    ca, server = pki
    with s3_server(tls=server) as endpoint:
        settings = Settings(store="minio", minio_endpoint=endpoint, minio_access_key=S3_KEY,
                            minio_secret_key=S3_SECRET, minio_secure=True, minio_ca_file=ca.cert_file,
                            bucket="secure-bucket")
        store = open_store(settings)
        store.put("images/a.png", b"over TLS")
        assert store.get("images/a.png") == b"over TLS"
        assert list(store.list("images/")) == ["images/a.png"]

        # the public roots do not vouch for a private CA; plaintext to the HTTPS port gets no answer
        with pytest.raises(TransientError, match="CERTIFICATE_VERIFY_FAILED"):
            MinioStore(endpoint, S3_KEY, S3_SECRET, "secure-bucket", secure=True)
        with pytest.raises(TransientError, match=f"object store at {endpoint} unusable"):
            MinioStore(endpoint, S3_KEY, S3_SECRET, "secure-bucket", secure=False)


def test_minio_ca_file_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="DATAENGINE_MINIO_CA_FILE is for HTTPS"):
        Settings(minio_ca_file=tmp_path / "ca.crt")
    with pytest.raises(FailedPrecondition, match="DATAENGINE_MINIO_CA_FILE .*missing.crt is not a file"):
        MinioStore("127.0.0.1:1", S3_KEY, S3_SECRET, "bucket", secure=True, ca_file=tmp_path / "missing.crt")


@pytest.fixture(scope="module")
def secure_redis(pki, tmp_path_factory):
    """A redis-server taking TLS only and the password "s3cret"; yields its rediss:// URL."""
    _, server = pki
    with redis_server(tmp_path_factory.mktemp("redis-tls"), tls=server, password="s3cret") as url:
        yield url


def test_queues_and_index_over_rediss_with_a_password(secure_redis, local_store):
    assert secure_redis.startswith("rediss://:s3cret@localhost:")
    app = create_celery(Settings(broker_url=secure_redis))
    core = ConceptsCore("ontology", local_store, 10**6, Settings())
    register_tasks(app, lambda: core, max_attempts=1)
    local_store.put("in/a.png", png(16, 16))
    with start_worker(app, pool="solo", perform_ping_check=False, queues=["concepts"], shutdown_timeout=30):
        outcome = TaskOutcome.from_json(app.send_task(TASK_NAME, args=["in/a.png", ["dog"]]).get(timeout=60))
    assert outcome.ok, outcome.reason

    index = RedisIndex(secure_redis)
    index.add_dead_letter({"item_id": "x", "reason": "over TLS"})
    assert [d["reason"] for d in index.dead_letters()] == ["over TLS"]


def test_redis_refuses_a_client_without_the_password_or_without_tls(secure_redis):
    no_password = secure_redis.replace(":s3cret@", "")
    with pytest.raises(TransientError, match="authenticated"):
        RedisIndex(no_password).dead_letters()
    wrong = secure_redis.replace(":s3cret@", ":guess@")
    with pytest.raises(TransientError, match="invalid username-password pair|WRONGPASS"):
        RedisIndex(wrong).dead_letters()
    plaintext = "redis://:s3cret@" + secure_redis.split("@", 1)[1].split("?", 1)[0]
    with pytest.raises(TransientError):
        RedisIndex(plaintext).dead_letters()
