"""Storage faults are the store's condition, never a key's: a full, read-only or failing store
raises ``StorageFull`` / ``StorageUnavailable`` (transient, naming the cause and the key, counted in
``dataengine_storage_faults_total``) from both backends; a missing object stays ``NotFound`` and a
bad key ``InvalidInput``; peers and the studio see them as RESOURCE_EXHAUSTED / UNAVAILABLE and
507 / 503. On a real tmpfs where the test may mount one, and injected at the boundary everywhere."""

from __future__ import annotations

import errno
import os
import pathlib
from types import SimpleNamespace

import grpc
import pytest
import urllib3
from fastapi.testclient import TestClient
from minio.error import InvalidResponseError, S3Error, ServerError

from services.common.errors import (InvalidInput, NotFound, StorageFull, StorageUnavailable, TransientError,
                                    error_from_rpc)
from services.common.storage import LocalStore, MinioStore, s3_fault
from services.studio.app import create_app
from tests.full_disk import faults, fill, full_disk, remount, tmpfs  # noqa: F401 - full_disk: a fixture

E = errno


# -- a real small filesystem ------------------------------------------------------------------------

def test_a_full_tmpfs_refuses_writes_as_storage_full_and_takes_them_once_freed(tmp_path):
    with tmpfs(tmp_path / "fs", "1m") as fs:
        store = LocalStore(fs / "bucket")
        store.put("keep/a.bin", b"kept")
        before = faults("full")
        with pytest.raises(StorageFull, match=r"object store full: writing 'big/b.bin' in .* ENOSPC") as info:
            store.put("big/b.bin", b"\1" * (2 << 20))
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and isinstance(info.value, TransientError)
        assert faults("full") == before + 1
        assert not any(p.name.startswith(".tmp-") for p in (fs / "bucket").rglob("*"))  # no half-written file left
        assert store.get("keep/a.bin") == b"kept" and not store.exists("big/b.bin")

        ballast = fill(fs)  # full to the last page: even a small write fails
        with pytest.raises(StorageFull, match="small.bin"):
            store.put("small.bin", b"x" * 8192)
        ballast.unlink()
        store.put("small.bin", b"x" * 8192)  # space freed: the same write goes through
        assert store.get("small.bin") == b"x" * 8192


def test_a_read_only_tmpfs_is_storage_unavailable_and_still_reads(tmp_path):
    with tmpfs(tmp_path / "fs", "1m") as fs:
        store = LocalStore(fs / "bucket")
        store.put("a/b.json", b"{}")
        remount(fs, "ro")
        before = faults("unavailable")
        with pytest.raises(StorageUnavailable, match=r"object store unavailable: writing 'a/c.json' .*EROFS") as info:
            store.put("a/c.json", b"{}")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(StorageUnavailable, match="deleting 'a/b.json'"):
            store.delete("a/b.json")
        assert faults("unavailable") == before + 2
        assert store.get("a/b.json") == b"{}" and list(store.list("a/")) == ["a/b.json"]
        remount(fs, "rw")
        store.put("a/c.json", b"[]")


# -- injected at the boundary ------------------------------------------------------------------------

def _raise(err: int):
    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err), "/injected")
    return fail


# (operation, what it patches, the call); each raises the errno the row injects
OPERATIONS = [
    ("writing", None, lambda s: s.put("a/b.bin", b"x")),  # os.fdopen of the temporary file: FullDisk
    ("reading", (pathlib.Path, "read_bytes"), lambda s: s.get("a/b.bin")),
    ("checking", (pathlib.Path, "is_file"), lambda s: s.exists("a/b.bin")),
    ("deleting", (pathlib.Path, "unlink"), lambda s: s.delete("a/b.bin")),
    ("listing", (os, "scandir"), lambda s: list(s.list("a/"))),
]
ERRNOS = [
    (E.ENOSPC, StorageFull),  # no space left
    (E.EDQUOT, StorageFull),  # the user's quota
    (E.EROFS, StorageUnavailable),  # remounted read-only (an ext4 error does that)
    (E.EIO, StorageUnavailable),  # a failing disk or a network filesystem gone
    (E.EACCES, StorageUnavailable),  # the store's files not ours (a volume mounted with another owner)
    (E.ESTALE, StorageUnavailable),  # an NFS handle gone stale
]


@pytest.mark.parametrize("what,target,call", OPERATIONS, ids=[o[0] for o in OPERATIONS])
@pytest.mark.parametrize("err,fault", ERRNOS, ids=[E.errorcode[e] for e, _ in ERRNOS])
def test_every_operation_raises_the_fault_naming_the_key_and_the_cause(local_store, monkeypatch, full_disk,
                                                                          what, target, call, err, fault):
    local_store.put("a/b.bin", b"x")
    if target is None:
        full_disk(local_store.root, {"": 1}, err)
    else:
        monkeypatch.setattr(*target, _raise(err))
    before = faults(fault.kind)
    with pytest.raises(fault) as info:
        call(local_store)
    message = str(info.value)
    assert message.startswith(f"{fault.prefix}: {what} 'a/") and E.errorcode[err] in message
    assert str(local_store.root) in message
    assert faults(fault.kind) == before + 1


def test_a_store_root_that_cannot_be_made_is_storage_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(pathlib.Path, "mkdir", _raise(E.EACCES))
    with pytest.raises(StorageUnavailable, match=r"object store unavailable: opening .*/store failed: EACCES"):
        LocalStore(tmp_path / "store")


def test_a_missing_object_and_a_bad_key_are_not_storage_faults(local_store, monkeypatch):
    local_store.put("a", b"an object")
    with pytest.raises(NotFound):
        local_store.get("missing/key")
    with pytest.raises(NotFound):
        local_store.get("a/b")  # below an object: ENOTDIR
    with pytest.raises(InvalidInput, match="'a/b'"):
        local_store.put("a/b", b"x")  # a folder where an object is
    with pytest.raises(InvalidInput, match="ENAMETOOLONG"):
        local_store.put("x" * 300, b"x")  # a segment longer than the filesystem's names
    assert local_store.exists("a") and not local_store.exists("missing/key")
    monkeypatch.setattr(pathlib.Path, "read_bytes", _raise(E.EXDEV))
    with pytest.raises(OSError) as info:  # an errno no store fault has: a bug, raised as it is
        local_store.get("a")
    assert not isinstance(info.value, TransientError)


# -- S3 / MinIO ----------------------------------------------------------------------------------------

def _s3(code: str, status: int) -> S3Error:
    return S3Error(SimpleNamespace(status=status), code, "injected", "/b/k", "req", "host")


S3_CASES = [
    (_s3("XMinioStorageFull", 507), StorageFull),  # MinIO: every disk full
    (_s3("XMinioAdminBucketQuotaExceeded", 400), StorageFull),  # the bucket's quota
    (ServerError("server failed with HTTP status code 507", 507), StorageFull),  # 507 without a body
    (_s3("SlowDown", 503), StorageUnavailable),  # throttled
    (_s3("XMinioServerNotInitialized", 503), StorageUnavailable),  # starting
    (InvalidResponseError(503, "text/html", "<html>busy</html>"), StorageUnavailable),  # a proxy's 503
    (urllib3.exceptions.MaxRetryError(None, "/b/k", "connection refused"), StorageUnavailable),  # unreachable
    (_s3("AccessDenied", 403), TransientError),  # credentials: retried, then a dead letter
    (_s3("InternalError", 500), TransientError),
]


@pytest.mark.parametrize("exc,fault", S3_CASES, ids=[type(e).__name__ + ":" + str(getattr(e, "code", ""))
                                                     for e, _ in S3_CASES])
def test_s3_errors_are_classified_naming_the_key(exc, fault):
    got = s3_fault(exc, "writing", "items/x/manifest.json", "dataengine")
    assert type(got) is fault
    assert "writing 'items/x/manifest.json' in bucket 'dataengine'" in str(got)


def test_a_minio_put_on_a_full_server_is_storage_full():
    class FullServer:
        def put_object(self, *args, **kwargs):
            raise _s3("XMinioStorageFull", 507)

    store = object.__new__(MinioStore)  # the client alone: no server to make the bucket on
    store.client, store.bucket = FullServer(), "dataengine"
    before = faults("full")
    with pytest.raises(StorageFull, match="object store full: writing 'a/b.bin' in bucket 'dataengine'.*"
                                          "XMinioStorageFull"):
        store.put("a/b.bin", b"x")
    assert faults("full") == before + 1


# -- what peers and browsers see ------------------------------------------------------------------------

class _RpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("code,details,cls", [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "object store full: writing 'k' ...", StorageFull),
    (grpc.StatusCode.UNAVAILABLE, "object store unavailable: reading 'k' ...", StorageUnavailable),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max", TransientError),  # not the store
    (grpc.StatusCode.UNAVAILABLE, "failed to connect", TransientError),
])
def test_a_peers_storage_fault_is_raised_again_as_itself(code, details, cls):
    got = error_from_rpc(_RpcError(code, details))
    assert type(got) is cls and details in str(got)


@pytest.mark.parametrize("fault,status", [(StorageFull, 507), (StorageUnavailable, 503)])
def test_the_studio_answers_a_storage_fault_with_its_status_and_reason(fault, status):
    class Backend:
        def waiting(self, caller):
            raise fault(f"{fault.prefix}: writing 'items/x/manifest.json' in /srv failed: ENOSPC")

    with TestClient(create_app(Backend(), lease_s=60)) as client:
        reply = client.get("/api/queue", headers={"X-Annotator": "alice"})
    assert reply.status_code == status
    assert reply.json()["detail"].startswith(fault.prefix) and "items/x/manifest.json" in reply.json()["detail"]
