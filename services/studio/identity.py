"""Who is calling: the one place the studio learns the annotator's identity.

Without a tokens file (``dataengine studio OUT_DIR``, a trusted machine) the page sends the name it
signed in with in the ``X-Annotator`` header (percent-encoded: header values are Latin-1). With one
(``DATAENGINE_AUTH_TOKENS_FILE``, a deployment) it sends ``Authorization: Bearer <token>``; the
annotator is the token's principal, whatever name a client types, and the token travels on to the
orchestrator and the decoder, which check it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable
from urllib.parse import unquote

from fastapi import Header, HTTPException

from services.common.auth import REVIEW, TokenFile, bearer
from services.common.errors import InvalidInput
from services.common.review import annotator_name

HEADER = "X-Annotator"


@dataclass(frozen=True)
class Caller:
    """The signed-in annotator; ``token`` their bearer token ("" where authentication is off)."""

    name: str
    token: str = ""


def caller_from_token(tokens: TokenFile, token: str) -> Caller:
    principal = tokens.principal(token)
    if principal is None:
        raise HTTPException(401, "a valid token is needed: sign in with yours (Authorization: Bearer <token>)")
    if principal.role not in REVIEW:
        raise HTTPException(403, f"{principal.name} is an {principal.role}; the studio is for annotators and admins")
    return Caller(principal.name, token)


def identity(tokens: TokenFile | None) -> Callable[..., Caller]:
    """The FastAPI dependency that names the caller, by tokens where there are some."""
    if tokens is not None:
        def by_token(authorization: str | None = Header(None, description="Bearer <token>")) -> Caller:
            return caller_from_token(tokens, bearer(authorization))

        return by_token

    def by_name(x_annotator: str | None = Header(None, alias=HEADER,
                                                 description="The signed-in annotator's name, percent-encoded")) -> Caller:
        if not x_annotator:
            raise HTTPException(401, f"sign in first: POST /api/signin, then send your name in the {HEADER} header")
        try:
            return Caller(annotator_name(unquote(x_annotator)))
        except InvalidInput as exc:
            raise HTTPException(401, str(exc)) from None

    return by_name
