"""Object store: one interface, a MinIO-client backend (deployments, S3 servers) and a
local-directory backend (embedded mode). Keys are validated so none can escape the bucket."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Iterator, Protocol

from services.common.errors import FailedPrecondition, InvalidInput, NotFound, TransientError
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
    """Bytes by key. ``get`` raises ``NotFound``; storage trouble raises ``TransientError``."""

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str = "") -> Iterator[str]: ...


class LocalStore:
    """A directory as a bucket; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"object {key!r} not found in {self.root}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, sorted segment by segment (as sorted paths), lazily.

        Only the folder the prefix names is walked (``items/ab`` lists ``root/items`` for names
        starting with ``ab``, then their subfolders), depth first, holding one listing per level:
        a store of images, embeddings and masks is not read to find its manifests. Temporary files
        of unfinished writes (``.tmp-*``) are not keys.
        """
        import heapq

        def walk(folder: Path, key_prefix: str, start: str = "") -> Iterator[str]:
            folders, files = [], []  # names only (a folder of 10^6 items: ~80 MB while it is walked)
            try:
                with os.scandir(folder) as entries:
                    for e in entries:  # the kind from the listing's d_type, no stat per entry
                        if not e.name.startswith(start):
                            continue
                        if e.is_dir(follow_symlinks=False):
                            folders.append(e.name)
                        elif e.is_file() and not e.name.startswith(".tmp-"):
                            files.append(e.name)
            except (FileNotFoundError, NotADirectoryError):
                return
            folders.sort()
            files.sort()
            for name, is_folder in heapq.merge(((n, True) for n in folders), ((n, False) for n in files)):
                if is_folder:
                    yield from walk(folder / name, f"{key_prefix}{name}/")
                else:
                    yield key_prefix + name

        folder, _, start = prefix.rpartition("/")
        if folder and any(part in ("", ".", "..") for part in folder.split("/")):
            return  # no key has such a segment (and the walk must not leave the root)
        yield from walk(self.root / folder if folder else self.root, f"{folder}/" if folder else "", start)


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
            raise TransientError(f"writing {key!r} to the object store failed: {exc}") from exc

    def get(self, key: str) -> bytes:
        check_key(key)
        response = None
        try:
            response = self.client.get_object(self.bucket, key)
            return response.read()
        except Exception as exc:
            if _is_s3_error(exc, "NoSuchKey", "NoSuchObject"):
                raise NotFound(f"object {key!r} not found in bucket {self.bucket!r}") from None
            raise TransientError(f"reading {key!r} from the object store failed: {exc}") from exc
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
            raise TransientError(f"checking {key!r} in the object store failed: {exc}") from exc

    def delete(self, key: str) -> None:
        check_key(key)
        try:
            self.client.remove_object(self.bucket, key)
        except Exception as exc:
            raise TransientError(f"deleting {key!r} from the object store failed: {exc}") from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        try:
            for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
                yield obj.object_name
        except Exception as exc:
            raise TransientError(f"listing {prefix!r} in the object store failed: {exc}") from exc


def _https_client(ca_file: Path):
    """minio's own pool settings, with the private CA as the only trusted root."""
    import urllib3

    if not Path(ca_file).is_file():
        raise ValueError(f"DATAENGINE_MINIO_CA_FILE {ca_file} is not a file")
    return urllib3.PoolManager(timeout=urllib3.Timeout(connect=30, read=300), maxsize=10,
                               cert_reqs="CERT_REQUIRED", ca_certs=str(ca_file),
                               retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]))


def _is_s3_error(exc: Exception, *codes: str) -> bool:
    from minio.error import S3Error

    return isinstance(exc, S3Error) and exc.code in codes


def open_store(settings: Settings) -> ObjectStore:
    """The store the settings name."""
    if settings.store == "minio":
        return MinioStore(settings.minio_endpoint, settings.minio_access_key, settings.minio_secret_key,
                          settings.bucket, settings.minio_secure, settings.minio_ca_file)
    return LocalStore(Path(settings.store_root) / settings.bucket)
