"""Every HTTP request: its latency on `mailrail_http_request_seconds`, and a server span.

The span continues the caller's trace when the request carries `traceparent`, else starts
one; whatever the request writes to Kafka carries it on (`services/runtime/tracing.py`), so a
message's trace starts at `POST /v1/messages`. Routes are labelled by their template
(`/v1/messages/{message_id}`), never by the raw path, so the label set stays small.
"""

import time

from opentelemetry.trace import SpanKind
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.runtime import tracing
from services.runtime.telemetry_metrics import histogram

REQUEST_SECONDS = histogram(
    "mailrail_http_request_seconds",
    "Ingest HTTP requests, from the first byte read to the last byte written",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
_UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})


def route_of(scope: Scope) -> str:
    """The matched route's template, or `other` (a 404 must not mint a label per path)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "other"


class Observe:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def record_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        method = str(scope["method"])
        try:
            if scope["path"] in _UNTRACED:
                await self.app(scope, receive, record_status)
            else:
                await self._traced(scope, receive, record_status, method)
        finally:
            REQUEST_SECONDS.labels(method, route_of(scope), str(status[0])).observe(
                time.perf_counter() - started
            )

    async def _traced(self, scope: Scope, receive: Receive, send: Send, method: str) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        with tracing.tracer().start_as_current_span(
            method,
            context=tracing.context_from_http(headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": str(scope["path"])},
        ) as span:
            status = [0]

            async def note(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status[0] = int(message["status"])
                await send(message)

            await self.app(scope, receive, note)
            route = route_of(scope)
            span.update_name(f"{method} {route}")
            span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", status[0])
            if status[0] >= 500:
                tracing.fail(span, f"HTTP {status[0]}")
