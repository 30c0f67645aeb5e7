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


def _listed_by_full_walk(store, prefix: str) -> list[str]:
    """What LocalStore.list returned before it walked only the prefix's folder: every file under
    the root, sorted as paths, filtered by prefix."""
    keys = (p.relative_to(store.root).as_posix() for p in sorted(store.root.rglob("*"))
            if p.is_file() and not p.name.startswith(".tmp-"))
    return [k for k in keys if k.startswith(prefix)]


@pytest.mark.parametrize("prefix", [
    "",               # everything
    "items/",         # a whole folder
    "items/ab",       # part of a name: ab, ab-c and abc, not b
    "items/ab/",      # one item's folder
    "items/ab/m",     # a file name's start
    "items",          # a name's start at the root: items/ and items2/
    "items/ab/manifest.json",  # one key
    "nowhere/",       # a folder that does not exist
    "items/ab/manifest.json/x",  # a file named as a folder
    "../",            # outside the root: nothing, never the parent
    "items//",        # an empty segment
    "/items/",        # absolute
])
def test_local_list_walks_only_the_prefix_and_matches_a_full_walk(local_store, prefix):
    for key in ["items/ab/manifest.json", "items/ab/decode.json", "items/ab-c/manifest.json",
                "items/abc/manifest.json", "items/b/manifest.json", "items2/x", "images/ab", "a-b", "a/b"]:
        local_store.put(key, b"x")
    (local_store.root / "items" / "ab" / ".tmp-123").write_bytes(b"half")  # an unfinished write
    listed = local_store.list(prefix)
    assert iter(listed) is listed  # a generator: keys come as the walk finds them
    assert list(listed) == _listed_by_full_walk(local_store, prefix)


def test_local_list_does_not_read_folders_outside_the_prefix(local_store, monkeypatch):
    import os

    local_store.put("items/a/manifest.json", b"{}")
    local_store.put("images/a", b"x")
    scanned = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: scanned.append(str(path)) or real_scandir(path))
    assert list(local_store.list("items/")) == ["items/a/manifest.json"]
    assert not any("images" in path for path in scanned) and str(local_store.root) not in scanned
