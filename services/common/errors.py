"""Domain errors; each maps to one gRPC status code and is recorded as an item's failure reason."""

from __future__ import annotations

import grpc


class DataEngineError(Exception):
    """Base class: a problem with a clear message naming what was wrong."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInput(DataEngineError, ValueError):
    """The caller sent something unusable (bad image bytes, NaN coordinates, empty prompt)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(DataEngineError, KeyError):
    """A referenced object (image, embedding, logits) does not exist."""

    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class FailedPrecondition(DataEngineError):
    """The request is well formed but the system is not in a state to serve it
    (an embedding from another model, a crop embedding that was never computed)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class TransientError(DataEngineError):
    """Storage or network trouble worth retrying."""

    code = grpc.StatusCode.UNAVAILABLE


class StorageFault(TransientError):
    """The object store cannot take or serve bytes for a while: an infrastructure fault, never the
    item's. Steps retry it with the capped backoff for as long as it lasts (no dead letter), so no
    item fails for it. ``kind``: the ``dataengine_storage_faults_total`` label."""

    kind = "unavailable"
    prefix = "object store unavailable"


class StorageFull(StorageFault):
    """No space or quota left in the store (ENOSPC, EDQUOT, MinIO's XMinioStorageFull, HTTP 507)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    kind = "full"
    prefix = "object store full"


class StorageUnavailable(StorageFault):
    """The store is read-only, unreachable or failing (EROFS, EIO, EACCES on its files, S3 SlowDown
    or 503): retry later."""


def error_from_rpc(exc: grpc.RpcError) -> DataEngineError:
    """The domain error a gRPC client got back (a peer's status code and details), so a client of
    another service raises what that service's core raised; unknown codes are transient."""
    by_code = {cls.code: cls for cls in (InvalidInput, NotFound, FailedPrecondition, Unauthenticated,
                                          PermissionDenied)}
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    for fault in (StorageFull, StorageUnavailable):  # a peer's store fault, by its message's prefix
        if code == fault.code and str(details).startswith(fault.prefix):
            return fault(details)
    cls = by_code.get(code, TransientError)
    return cls(details if cls is not TransientError else f"{code.name}: {details}")


class Unauthenticated(DataEngineError):
    """No credentials, or credentials nobody issued."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(DataEngineError):
    """A known caller whose role does not allow what it asked (or who acts as someone else)."""

    code = grpc.StatusCode.PERMISSION_DENIED
