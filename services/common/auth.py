"""Who may do what: bearer tokens checked against a file of their SHA-256 digests, each naming a
principal and a role, and the role each RPC needs.

``DATAENGINE_AUTH_TOKENS_FILE`` is a JSON list of ``{"sha256": "<hex digest of the token>",
"principal": "alice", "role": "annotator"}``: only digests are on disk. It is read again when it
changes (size or modification time), so a token is added or revoked without a restart. Clients
send ``authorization: Bearer <token>`` (gRPC metadata, HTTP header); ``DATAENGINE_AUTH_TOKEN`` is
the token the CLI and the studio send.

Roles: ``annotator`` reviews and clicks (NextReview, SubmitReview, Heartbeat, ReleaseReview,
Predict) and reads items; ``operator`` runs the engine (Submit, Export, the model services' RPCs)
and reads; ``admin`` may do everything. The health and reflection services stay open for probes.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidInput, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

ROLES = ("annotator", "operator", "admin")
READ = frozenset(ROLES)
REVIEW = frozenset({"annotator", "admin"})
OPERATE = frozenset({"operator", "admin"})
CLICK = frozenset(ROLES)
# Full gRPC method name -> the roles that may call it. A method of ours not listed is admin's only.
METHOD_ROLES: dict[str, frozenset[str]] = {
    **{f"/dataengine.v1.Orchestrator/{m}": READ for m in ("GetItem", "ListItems", "Stats", "AnnotatorStats")},
    **{f"/dataengine.v1.Orchestrator/{m}": REVIEW for m in ("NextReview", "SubmitReview", "Heartbeat",
                                                              "ReleaseReview")},
    **{f"/dataengine.v1.Orchestrator/{m}": OPERATE for m in ("Submit", "Export")},
    "/dataengine.v1.Decoder/Predict": CLICK,
    "/dataengine.v1.Decoder/GenerateMasks": OPERATE,
    "/dataengine.v1.Embedder/Embed": OPERATE,
    "/dataengine.v1.Concepts/Propose": OPERATE,
    "/dataengine.v1.Verifier/Verify": OPERATE,
}
OPEN_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its name (the annotator of its reviews) and its role."""

    name: str
    role: str


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)


def current_principal() -> Principal | None:
    """The caller of the request being served, None where authentication is off."""
    return _current.get()


def set_principal(principal: Principal | None) -> contextvars.Token:
    return _current.set(principal)


def reset_principal(token: contextvars.Token) -> None:
    _current.reset(token)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(value: str | None) -> str:
    """The token of an ``authorization`` value ``Bearer <token>`` ("" if there is none)."""
    if not value:
        return ""
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class TokenFile:
    """The tokens file, read again whenever it changes; ``principal(token)`` looks a token up."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._by_digest: dict[str, Principal] = {}
        self._lock = threading.Lock()
        self._load()  # a missing or malformed file stops start-up, naming the problem

    def _load(self) -> None:
        try:
            stat = os.stat(self.path)
            entries = json.loads(self.path.read_text())
        except OSError as exc:
            raise InvalidInput(f"DATAENGINE_AUTH_TOKENS_FILE {self.path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise InvalidInput(f"DATAENGINE_AUTH_TOKENS_FILE {self.path} is not JSON: {exc}") from None
        if not isinstance(entries, list):
            raise InvalidInput(f"DATAENGINE_AUTH_TOKENS_FILE {self.path} must be a JSON list of "
                               '{"sha256", "principal", "role"} objects')
        by_digest = {}
        for i, e in enumerate(entries):
            ok = (isinstance(e, dict) and isinstance(e.get("sha256"), str) and len(e["sha256"]) == 64
                  and isinstance(e.get("principal"), str) and e["principal"].strip() and e.get("role") in ROLES)
            if not ok:
                raise InvalidInput(f"{self.path} entry {i} needs a 64-hex 'sha256', a 'principal' and a 'role' "
                                   f"({', '.join(ROLES)}), got {json.dumps(e)[:120]}")
            by_digest[e["sha256"].lower()] = Principal(e["principal"].strip(), e["role"])
        self._by_digest, self._stamp = by_digest, (stat.st_mtime_ns, stat.st_size)

    def principal(self, token: str) -> Principal | None:
        if not token:
            return None
        with self._lock:
            try:
                stat = os.stat(self.path)
                if (stat.st_mtime_ns, stat.st_size) != self._stamp:
                    self._load()
                    log.info("auth tokens reloaded", extra={"key": str(self.path)})
            except (OSError, InvalidInput) as exc:  # keep the last good set: a bad edit locks nobody out
                log.warning("auth tokens file unreadable, keeping the last one: %s", exc)
            # A lookup by the token's digest: its timing says nothing about the token itself.
            return self._by_digest.get(digest(token))


def authorize(tokens: TokenFile, authorization: str | None, method: str) -> Principal:
    """The caller of ``method`` (a full gRPC name) by its ``authorization`` value; Unauthenticated
    or PermissionDenied naming why not."""
    principal = tokens.principal(bearer(authorization))
    if principal is None:
        raise Unauthenticated("a valid token is needed: send 'authorization: Bearer <token>' "
                              "(DATAENGINE_AUTH_TOKEN for the CLI and the studio)")
    allowed = METHOD_ROLES.get(method, frozenset({"admin"}))
    if principal.role not in allowed:
        raise PermissionDenied(f"{principal.name} ({principal.role}) may not call {method}; "
                               f"that needs {' or '.join(sorted(allowed))}")
    return principal


def acting_as(claimed: str) -> str:
    """The annotator a review request acts for: the caller's principal where authentication is on
    (a name the client typed must be that one), else the name given."""
    principal = current_principal()
    if principal is None:
        return claimed
    if claimed.strip() and claimed.strip() != principal.name:
        raise PermissionDenied(f"you are {principal.name!r}; you cannot act as {claimed.strip()!r}")
    return principal.name
