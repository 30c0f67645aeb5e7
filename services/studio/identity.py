"""Who is calling: the one place the studio learns the annotator's identity.

Today the page sends the name it signed in with in the ``X-Annotator`` header (percent-encoded, as
header values are Latin-1). The security issue replaces this dependency's body with a token check;
the handlers, which only take ``annotator: str = Depends(annotator)``, stay as they are.
"""

from __future__ import annotations

from urllib.parse import unquote

from fastapi import Header, HTTPException

from services.common.errors import InvalidInput
from services.common.review import annotator_name

HEADER = "X-Annotator"


def annotator(x_annotator: str | None = Header(None, alias=HEADER,
                                               description="The signed-in annotator's name, percent-encoded")) -> str:
    if not x_annotator:
        raise HTTPException(401, f"sign in first: POST /api/signin, then send your name in the {HEADER} header")
    try:
        return annotator_name(unquote(x_annotator))
    except InvalidInput as exc:
        raise HTTPException(401, str(exc)) from None
