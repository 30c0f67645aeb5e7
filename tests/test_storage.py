"""Both object-store backends behave the same; no key escapes the bucket."""

import pytest

from services.common.errors import FailedPrecondition, InvalidInput, NotFound, TransientError
from services.common.storage import MinioStore, check_key


@pytest.fixture(params=["local", "minio"])
def store(request, local_store, s3_endpoint):
    if request.param == "local":
        return local_store
    return request.getfixturevalue("minio_store")


def test_put_get_overwrite_list_delete(store):
    store.put("a/b/c.bin", b"one")
    store.put("a/b/c.bin", b"two")  # deterministic keys: a re-run overwrites
    store.put("a/d.json", b"{}")
    assert store.get("a/b/c.bin") == b"two"
    assert store.exists("a/b/c.bin") and not store.exists("a/b/zzz")
    assert sorted(store.list("a/")) == ["a/b/c.bin", "a/d.json"]
    store.delete("a/b/c.bin")
    assert not store.exists("a/b/c.bin")


def test_missing_key_is_not_found(store):
    with pytest.raises(NotFound, match="missing/key"):
        store.get("missing/key")


@pytest.mark.parametrize("key", [
    "",                 # empty
    "/etc/passwd",      # absolute
    "../outside",       # parent escape
    "a/../../b",        # escape in the middle
    "a//b",             # empty segment
    "a/./b",            # dot segment
    "a\\b",             # backslash
    "a\nb",             # control character
    "x" * 1025,         # too long
])
def test_unsafe_keys_rejected(key, local_store):
    with pytest.raises(InvalidInput):
        check_key(key)
    with pytest.raises(InvalidInput):
        local_store.put(key, b"x")


def test_local_store_stays_inside_root(local_store, tmp_path):
    with pytest.raises(InvalidInput):
        local_store.get("../secret")
    assert not (tmp_path / "secret").exists()


@pytest.mark.parametrize("bucket", ["Bad_Bucket", "ab", "a..b"])
def test_misconfigured_bucket_is_a_failed_precondition_not_a_retry(bucket, s3_endpoint):
    # A bad bucket name never heals: it must not be retried as storage trouble.
    with pytest.raises(FailedPrecondition, match="bucket"):
        MinioStore(s3_endpoint, "k", "s", bucket=bucket)


def test_unreachable_store_is_transient():
    # Nothing listens on port 9 (discard): the server may come back, so this one is retried.
    with pytest.raises(TransientError, match="127.0.0.1:9"):
        MinioStore("127.0.0.1:9", "k", "s", bucket="fine-bucket")
