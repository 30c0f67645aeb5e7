"""Object store: one interface, a MinIO-client backend (deployments, S3 servers) and a
local-directory backend (embedded mode). Keys are validated so none can escape the bucket."""

from __future__ import annotations

import errno
import io
import itertools
import os
import tempfile
from pathlib import Path
from typing import Iterator, NoReturn, Protocol

from services.common.external_sort import sorted_names
from services.common.errors import (FailedPrecondition, InvalidInput, NotFound, StorageFault, StorageFull,
                                    StorageUnavailable, TransientError)
from services.common.metrics import STORAGE_FAULTS
from services.common.settings import Settings

MAX_KEY_LEN = 1024


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ``InvalidInput``.

    Rejects empty keys, absolute paths, ``.``/``..`` segments, empty segments, backslashes and
    control characters, so a key can never name a file outside the store's root.
    """
    if not isinstance(key, str) or not key:
        raise InvalidInput("object key is empty")
    if len(key) > MAX_KEY_LEN:
        raise InvalidInput(f"object key is longer than {MAX_KEY_LEN} characters")
    if key.startswith("/") or "\\" in key or any(ord(c) < 32 for c in key):
        raise InvalidInput(f"object key {key!r} must be relative, without backslashes or control characters")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidInput(f"object key {key!r} has an empty, '.' or '..' segment")
    return key


class ObjectStore(Protocol):
    """Bytes by key. ``get`` raises ``NotFound``; a bad key ``InvalidInput``; storage trouble
    ``TransientError``: ``StorageFull`` (no space or quota) and ``StorageUnavailable`` (read-only,
    unreachable, failing) for a store that cannot work for a while, whatever the key."""

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str = "") -> Iterator[str]: ...


class LocalStore:
    """A directory as a bucket; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a read-only or foreign volume: the store unavailable, not a crash
            raise_os_fault(exc, "opening", "", self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        except OSError as exc:
            raise_os_fault(exc, "writing", key, self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException as exc:
            try:
                Path(tmp).unlink(missing_ok=True)
            except OSError:
                pass  # the store's own fault, raised below
            if isinstance(exc, OSError):
                raise_os_fault(exc, "writing", key, self.root)
            raise

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"object {key!r} not found in {self.root}") from None
        except OSError as exc:
            raise_os_fault(exc, "reading", key, self.root)

    def exists(self, key: str) -> bool:
        path = self._path(key)
        try:
            return path.is_file()
        except OSError as exc:  # is_file answers False only for a missing path
            raise_os_fault(exc, "checking", key, self.root)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise_os_fault(exc, "deleting", key, self.root)

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, sorted segment by segment (as sorted paths), lazily.

        Only the folder the prefix names is walked (``items/ab`` lists ``root/items`` for names
        starting with ``ab``, then their subfolders), depth first, holding one listing per level:
        a store of images, embeddings and masks is not read to find its manifests. Temporary files
        of unfinished writes (``.tmp-*``) are not keys.
        """
        def entries(folder: Path, start: str) -> Iterator[str]:
            # name + "\0" + kind (NUL sorts first, and no file name holds one): the kind travels
            # with the name through the sort. The kind comes from the listing's d_type: no stat.
            with os.scandir(folder) as listing:
                for e in listing:
                    if not e.name.startswith(start):
                        continue
                    if e.is_dir(follow_symlinks=False):
                        yield e.name + "\0d"
                    elif e.is_file() and not e.name.startswith(".tmp-"):
                        yield e.name + "\0f"

        def walk(folder: Path, key_prefix: str, start: str = "") -> Iterator[str]:
            try:
                # A folder of 10^6 items is sorted in spilled runs: memory holds one run, not every name.
                names = sorted_names(entries(folder, start))
                first = next(names, None)
            except (FileNotFoundError, NotADirectoryError):
                return
            for tagged in itertools.chain([first] if first is not None else [], names):
                name, kind = tagged[:-2], tagged[-1]
                if kind == "d":
                    yield from walk(folder / name, f"{key_prefix}{name}/")
                else:
                    yield key_prefix + name

        folder, _, start = prefix.rpartition("/")
        if folder and any(part in ("", ".", "..") for part in folder.split("/")):
            return  # no key has such a segment (and the walk must not leave the root)
        try:
            yield from walk(self.root / folder if folder else self.root, f"{folder}/" if folder else "", start)
        except OSError as exc:
            raise_os_fault(exc, "listing", prefix, self.root)


class MinioStore:
    """A bucket on MinIO or any S3-compatible server, through the ``minio`` client."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str,
                 secure: bool = False, ca_file: Path | None = None) -> None:
        """``secure``: HTTPS, the server's certificate checked against ``ca_file`` (a private CA's
        PEM bundle) or, without one, the public roots."""
        from minio import Minio

        from minio.helpers import check_bucket_name

        try:  # a bad name or endpoint is a configuration error: retrying cannot fix it
            check_bucket_name(bucket, strict=True)
            self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure,
                                http_client=_https_client(ca_file) if secure and ca_file else None)
        except ValueError as exc:
            raise FailedPrecondition(f"object store misconfigured (endpoint {endpoint!r}, "
                                     f"bucket {bucket!r}): {exc}") from None
        self.bucket = bucket
        try:
            if not self.client.bucket_exists(bucket):
                self.client.make_bucket(bucket)
        except Exception as exc:  # connection refused, bad credentials: say which server
            if _is_s3_error(exc, "BucketAlreadyOwnedByYou"):
                return
            raise TransientError(f"object store at {endpoint} unusable: {exc}") from exc

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        check_key(key)
        try:
            self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)
        except Exception as exc:
            raise s3_fault(exc, "writing", key, self.bucket) from exc

    def get(self, key: str) -> bytes:
        check_key(key)
        response = None
        try:
            response = self.client.get_object(self.bucket, key)
            return response.read()
        except Exception as exc:
            if _is_s3_error(exc, "NoSuchKey", "NoSuchObject"):
                raise NotFound(f"object {key!r} not found in bucket {self.bucket!r}") from None
            raise s3_fault(exc, "reading", key, self.bucket) from exc
        finally:
            if response is not None:
                response.close()
                response.release_conn()

    def exists(self, key: str) -> bool:
        check_key(key)
        try:
            self.client.stat_object(self.bucket, key)
            return True
        except Exception as exc:
            if _is_s3_error(exc, "NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise s3_fault(exc, "checking", key, self.bucket) from exc

    def delete(self, key: str) -> None:
        check_key(key)
        try:
            self.client.remove_object(self.bucket, key)
        except Exception as exc:
            raise s3_fault(exc, "deleting", key, self.bucket) from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        try:
            for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
                yield obj.object_name
        except Exception as exc:
            raise s3_fault(exc, "listing", prefix, self.bucket) from exc


def _https_client(ca_file: Path):
    """minio's own pool settings, with the private CA as the only trusted root."""
    import urllib3

    if not Path(ca_file).is_file():
        raise ValueError(f"DATAENGINE_MINIO_CA_FILE {ca_file} is not a file")
    return urllib3.PoolManager(timeout=urllib3.Timeout(connect=30, read=300), maxsize=10,
                               cert_reqs="CERT_REQUIRED", ca_certs=str(ca_file),
                               retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]))


# What a store's failure is. Full and unavailable are the store's condition, not the key's: steps
# retry them for as long as they last (steps.py). Other OSErrors of a LocalStore are a key the
# filesystem refuses (InvalidInput) or a bug (raised as they are).
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
UNAVAILABLE_ERRNOS = frozenset({errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM, errno.ESTALE, errno.ENOTCONN,
                                errno.ETIMEDOUT, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENODEV, errno.ENXIO,
                                errno.EMFILE, errno.ENFILE, errno.EBUSY, errno.EAGAIN})
BAD_KEY_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EEXIST})
# S3 error codes and HTTP statuses (MinIO's own codes included)
FULL_S3_CODES = frozenset({"XMinioStorageFull", "XMinioAdminBucketQuotaExceeded", "QuotaExceeded",
                           "InsufficientStorage"})
UNAVAILABLE_S3_CODES = frozenset({"SlowDown", "ServiceUnavailable", "XMinioServerNotInitialized",
                                  "XMinioReadQuorum", "XMinioWriteQuorum", "RequestTimeout"})


def storage_fault(kind: type[StorageFault], what: str, key: str, where: str, cause: str) -> StorageFault:
    """``kind`` naming the operation, the key, the store and the cause; counted in
    ``dataengine_storage_faults_total{kind}``."""
    STORAGE_FAULTS.labels(kind.kind).inc()
    target = f"{key!r} in {where}" if key else where
    return kind(f"{kind.prefix}: {what} {target} failed: {cause}")


def raise_os_fault(exc: OSError, what: str, key: str, root: Path) -> NoReturn:
    """Raise what ``exc`` (from an operation on ``key`` under ``root``) is: ``StorageFull``,
    ``StorageUnavailable``, ``InvalidInput`` for a key the filesystem refuses, else ``exc`` itself."""
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    cause = f"{name} ({exc.strerror or exc})"
    if exc.errno in FULL_ERRNOS:
        raise storage_fault(StorageFull, what, key, str(root), cause) from exc
    if exc.errno in UNAVAILABLE_ERRNOS:
        raise storage_fault(StorageUnavailable, what, key, str(root), cause) from exc
    if exc.errno in BAD_KEY_ERRNOS:
        raise InvalidInput(f"object key {key!r} cannot be a file in {root}: {cause}") from exc
    raise exc


def s3_fault(exc: Exception, what: str, key: str, bucket: str) -> TransientError:
    """A MinIO client error as the fault it is: ``StorageFull`` (XMinioStorageFull, a quota, HTTP
    507), ``StorageUnavailable`` (SlowDown, HTTP 503, no connection), else a ``TransientError``
    (retried, then a dead letter: e.g. AccessDenied)."""
    import urllib3
    from minio.error import InvalidResponseError, S3Error, ServerError

    code, status = "", 0
    if isinstance(exc, S3Error):
        code, status = exc.code or "", getattr(exc.response, "status", 0) or 0
    elif isinstance(exc, ServerError):
        status = exc.status_code
    elif isinstance(exc, InvalidResponseError):
        status = getattr(exc, "_code", 0) or 0
    cause = f"{code or type(exc).__name__}{f' (HTTP {status})' if status else ''}: {exc}"
    if code in FULL_S3_CODES or status == 507:
        return storage_fault(StorageFull, what, key, f"bucket {bucket!r}", cause)
    if code in UNAVAILABLE_S3_CODES or status == 503 or isinstance(exc, (urllib3.exceptions.HTTPError, OSError)):
        return storage_fault(StorageUnavailable, what, key, f"bucket {bucket!r}", cause)
    return TransientError(f"{what} {key!r} in bucket {bucket!r} failed: {exc}")


def _is_s3_error(exc: Exception, *codes: str) -> bool:
    from minio.error import S3Error

    return isinstance(exc, S3Error) and exc.code in codes


def open_store(settings: Settings) -> ObjectStore:
    """The store the settings name."""
    if settings.store == "minio":
        return MinioStore(settings.minio_endpoint, settings.minio_access_key, settings.minio_secret_key,
                          settings.bucket, settings.minio_secure, settings.minio_ca_file)
    return LocalStore(Path(settings.store_root) / settings.bucket)
