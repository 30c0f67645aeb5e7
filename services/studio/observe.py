"""The studio's metrics: every HTTP request counted and timed by its route template (an ASGI
middleware, so the figures cover the exception handlers' answers too), and ``/metrics``.

Route templates, not paths, label the series: ``/api/items/{item_id}/predict`` is one series
however many items there are.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.common.metrics import HTTP_REQUESTS, HTTP_SECONDS, ActiveAnnotators, scrape_registry


def _template(scope: dict) -> str:
    route = scope.get("route")  # FastAPI's router sets it on the scope it matched
    if route is not None and getattr(route, "path", ""):
        return route.path
    if scope.get("path", "").startswith("/static/"):
        return "/static"
    return "unmatched"  # a 404: never the raw path (anyone could make a series per URL)


class HttpMetrics:
    """ASGI middleware: ``dataengine_http_requests_total{method, route, code}`` and
    ``dataengine_http_request_seconds{method, route}``; an exception counts as a 500."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            method, route = scope.get("method", ""), _template(scope)
            HTTP_REQUESTS.labels(method, route, str(status[0])).inc()
            HTTP_SECONDS.labels(method, route).observe(time.perf_counter() - started)


def add_metrics(app: FastAPI, activity: ActiveAnnotators) -> None:
    """Count ``app``'s requests and serve ``/metrics`` on it (the studio has a port of its own
    already; Prometheus scrapes it there)."""
    app.add_middleware(HttpMetrics)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        activity.refresh()
        return Response(generate_latest(scrape_registry()), media_type=CONTENT_TYPE_LATEST)
