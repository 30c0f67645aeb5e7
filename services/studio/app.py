"""The studio's HTTP API (see API.md; the schema at /openapi.json) and its page (static files).

Handlers are thin: parse (pydantic bodies), call the backend (gRPC or in process), convert. The
engine's errors become a 4xx/5xx with ``{"detail": "..."}``: INVALID_ARGUMENT 400, NOT_FOUND 404,
FAILED_PRECONDITION 409 (a lease that expired or was taken over), the store full 507, unavailable 503.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from services.common.errors import (DataEngineError, FailedPrecondition, InvalidInput, NotFound, PermissionDenied,
                                    StorageFull, TransientError, Unauthenticated)
from services.common.metrics import STUDIO_CLICK_SECONDS, STUDIO_SUBMITS, ActiveAnnotators
from services.common.pb import orchestrator_pb2 as pb
from services.common.auth import TokenFile
from services.common.review import annotator_name
from services.studio.backend import StudioBackend
from services.studio.identity import Caller, caller_from_token, identity
from services.studio.images import browser_image
from services.studio.observe import add_metrics
from services.studio.views import (LeaseBody, PredictIn, SignIn, SubmitIn, item_json, lease_json, mask_json,
                                   predict_request)

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
# the first class an error is an instance of decides (StorageFull before TransientError)
STATUS = {InvalidInput: 400, Unauthenticated: 401, PermissionDenied: 403, NotFound: 404, FailedPrecondition: 409,
          StorageFull: 507, TransientError: 503}
ITEM_CACHE = 256  # items whose image and embedding keys the studio remembers (a few hundred bytes each)


@dataclass(frozen=True)
class ItemKeys:
    """What a click or an image request needs of an item, remembered so that a click costs no
    manifest read. height, width: pixels."""

    image_key: str
    embedding_key: str
    height: int
    width: int


class KeyCache:
    def __init__(self, backend: StudioBackend, size: int = ITEM_CACHE) -> None:
        self.backend, self.size = backend, size
        self._items: OrderedDict[str, ItemKeys] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, item: pb.Item) -> None:
        with self._lock:
            self._items[item.item_id] = ItemKeys(item.image_key, item.embedding_key, item.height, item.width)
            self._items.move_to_end(item.item_id)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get(self, caller: Caller, item_id: str) -> ItemKeys:
        with self._lock:
            keys = self._items.get(item_id)
        if keys is None or not keys.embedding_key:
            self.remember(self.backend.get_item(caller, item_id))
            with self._lock:
                keys = self._items[item_id]
        return keys


def create_app(backend: StudioBackend, lease_s: float, tokens: TokenFile | None = None) -> FastAPI:
    """The studio over ``backend``; ``lease_s`` (DATAENGINE_REVIEW_LEASE_S, kept in ``app.state``)
    tells the page how often to send heartbeats; ``tokens``: sign-in by token (None: by name)."""
    app = FastAPI(title="dataengine studio", version="1",
                  description="Annotators' review queue, leases, clicks and submissions; see API.md.")
    keys = KeyCache(backend)
    app.state.lease_s = lease_s
    signed_in = identity(tokens)
    activity = ActiveAnnotators()
    add_metrics(app, activity)

    def annotator(who: Caller = Depends(signed_in)) -> Caller:
        activity.seen(who.name)
        return who

    def view(item: pb.Item) -> dict:
        return item_json(item, app.state.lease_s)

    @app.exception_handler(DataEngineError)
    async def engine_error(request: Request, exc: DataEngineError) -> JSONResponse:
        status = next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 500)
        if status >= 500:
            log.warning("studio request failed", extra={"key": f"{request.url.path}: {exc}"})
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes each bad input: a NaN there cannot be written as JSON (a
        # 500), and a whole mask's RLE would come back. Where and what is wrong is enough.
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.get("/api/config", summary="How to sign in: by token (auth) or by name")
    def config() -> dict:
        return {"auth": tokens is not None}

    @app.post("/api/signin", summary="Sign in with a name (X-Annotator) or, with authentication, a token")
    def signin(body: SignIn) -> dict:
        if tokens is not None:
            return {"annotator": caller_from_token(tokens, body.token or "").name}
        if not body.name:
            raise InvalidInput("sign in with your name")
        return {"annotator": annotator_name(body.name)}

    @app.get("/api/queue", summary="Items waiting, per band of the review queue")
    def queue(who: Caller = Depends(annotator)) -> dict:
        bands = backend.waiting(who)
        return {"waiting": sum(bands.values()), "bands": bands}

    @app.post("/api/next", summary="Claim the next item (or get back the one you hold)")
    def next_item(who: Caller = Depends(annotator)) -> dict:
        item = backend.next_item(who)
        if item is None:
            raise NotFound("no item is waiting for review")
        keys.remember(item)
        return view(item)

    @app.get("/api/items/{item_id}", summary="An item (no lease)")
    def get_item(item_id: str, who: Caller = Depends(annotator)) -> dict:
        item = backend.get_item(who, item_id)
        keys.remember(item)
        return view(item)

    @app.get("/api/items/{item_id}/image", summary="The item's image, as the engine saw it",
             response_class=Response, responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}})
    def image(item_id: str, who: Caller = Depends(annotator)) -> Response:
        data, content_type = browser_image(backend.store.get(keys.get(who, item_id).image_key))
        return Response(data, media_type=content_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/items/{item_id}/heartbeat", summary="Keep your lease alive")
    def heartbeat(item_id: str, body: LeaseBody, who: Caller = Depends(annotator)) -> dict:
        return lease_json(backend.heartbeat(who, item_id, body.lease_token), app.state.lease_s)

    @app.post("/api/items/{item_id}/release", summary="Skip: give the item back to the queue")
    def release(item_id: str, body: LeaseBody, who: Caller = Depends(annotator)) -> dict:
        backend.release(who, item_id, body.lease_token)
        return {"released": True}

    @app.post("/api/items/{item_id}/predict", summary="Masks for clicks and a box (SAM's decoder)")
    def predict(item_id: str, body: PredictIn, response: Response, who: Caller = Depends(annotator)) -> dict:
        start = time.perf_counter()
        item = keys.get(who, item_id)
        if not item.embedding_key:
            raise FailedPrecondition(f"item {item_id} has no embedding yet; it cannot take clicks")
        reply, parts = backend.predict(who, predict_request(item.embedding_key, body))
        candidates = [mask_json(m) for m in reply.masks]
        timings = {name: round(seconds * 1000, 2) for name, seconds in parts.items()}
        total = time.perf_counter() - start
        STUDIO_CLICK_SECONDS.observe(total)
        timings["total"] = round(total * 1000, 2)
        response.headers["Server-Timing"] = ", ".join(f"{k};dur={v}" for k, v in timings.items())
        return {"candidates": candidates, "logits_key": reply.logits_key, "timings_ms": timings}

    @app.post("/api/items/{item_id}/submit", summary="Accept (with your phrases and masks) or discard")
    def submit(item_id: str, body: SubmitIn, who: Caller = Depends(annotator)) -> dict:
        item = backend.submit(who, body.to_submission(item_id, who.name))
        STUDIO_SUBMITS.labels(body.decision).inc()
        keys.remember(item)
        return {"item_id": item.item_id, "state": view(item)["state"],
                "audit": item.band == "audit"}

    @app.get("/api/annotators", summary="Per annotator: items/hour, masks/hour, seconds per mask, audits")
    def annotators(who: Caller = Depends(annotator)) -> dict:
        return {"annotators": [f.to_json() for f in backend.figures(who)]}

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"ok": True}

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
