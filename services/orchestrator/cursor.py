"""``ListItems`` page tokens: the position (the last id of the page before) and the listing's
filter, signed, so a page costs O(page) and a token is checked by its form and signature alone.

A token is ``base64url(JSON) "." base64url(HMAC-SHA256)[:22]``; the key is the index's shared
secret (every orchestrator process signs alike). A token that does not parse, whose signature does
not match, that was made for another filter or is older than ``max_age_s`` is refused with
``InvalidInput`` naming which: a client must start the listing again, never get a shifted page.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time

from services.common.errors import InvalidInput

MAX_TOKEN_CHARS = 512


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(key: bytes, body: str) -> str:
    return _b64(hmac.new(key, body.encode("ascii"), hashlib.sha256).digest())[:22]


def make_token(key: bytes, after: str, listing: str, now: float | None = None) -> str:
    """A token for the page after id ``after`` of the listing ``listing`` (its filter, as text)."""
    body = _b64(json.dumps({"a": after, "f": listing, "t": int(time.time() if now is None else now)},
                           separators=(",", ":")).encode())
    return f"{body}.{_sign(key, body)}"


def read_token(key: bytes, token: str, listing: str, max_age_s: float, now: float | None = None) -> str:
    """The id after which the next page starts; ``InvalidInput`` for a forged, foreign or stale token."""
    start_over = "; start the listing again without a page_token"
    if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
        raise InvalidInput(f"page_token {token[:80]!r} is not one ListItems returned{start_over}")
    body, signature = token.split(".")
    if not hmac.compare_digest(signature, _sign(key, body)):
        raise InvalidInput(f"page_token {token[:80]!r} has a bad signature (forged, or from another "
                           f"deployment){start_over}")
    try:
        fields = json.loads(_unb64(body))
        after, made_for, issued = str(fields["a"]), str(fields["f"]), float(fields["t"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidInput(f"page_token {token[:80]!r} is malformed{start_over}") from None
    if made_for != listing:
        raise InvalidInput(f"page_token was made for the listing {made_for!r}, not {listing!r}{start_over}")
    age = (time.time() if now is None else now) - issued
    if age > max_age_s:
        raise InvalidInput(f"page_token is {age:.0f} s old, older than {max_age_s:g} s (stale){start_over}")
    return after
