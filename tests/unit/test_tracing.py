"""Trace context across Kafka records: what each hop writes and continues."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from services.ingest.observe import Observe
from services.runtime import tracing

_EXPORTER = InMemorySpanExporter()
Headers = list[tuple[str, str | bytes | None]]


@pytest.fixture(scope="module", autouse=True)
def provider() -> Iterator[None]:
    """The SDK installed once for this process (OpenTelemetry allows one global provider)."""
    sdk = TracerProvider()
    sdk.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(sdk)
    yield


@pytest.fixture(autouse=True)
def clean() -> None:
    _EXPORTER.clear()


def hop(headers: Headers, topic: str) -> Headers:
    """A service consuming a record and writing one: the headers of what it writes."""
    with tracing.consume_span(topic, headers, "loop", key=b"k"):
        return tracing.with_trace_headers([("other", b"1")])


def test_a_record_chain_stays_in_the_trace_of_the_http_request() -> None:
    written: list[Headers] = []

    async def endpoint(_: Request) -> JSONResponse:
        written.append(tracing.with_trace_headers(None))
        return JSONResponse({}, 202)

    app = Observe(Starlette(routes=[Route("/v1/messages", endpoint, methods=["POST"])]))
    TestClient(app).post("/v1/messages")
    after_router = hop(written[0], "mail.accepted")
    after_sender = hop(after_router, "mail.outbound.default")
    hop(after_sender, "mail.events")

    spans = _EXPORTER.get_finished_spans()
    assert [s.name for s in spans] == [
        "POST /v1/messages",
        "mail.accepted process",
        "mail.outbound.default process",
        "mail.events process",
    ]
    assert len({s.context.trace_id for s in spans}) == 1
    for parent, child in itertools.pairwise(spans):
        assert child.parent is not None and child.parent.span_id == parent.context.span_id
    assert spans[1].attributes and spans[1].attributes["messaging.kafka.message.key"] == "k"
    assert ("other", b"1") in after_sender
    assert [k for k, _ in after_sender].count("traceparent") == 1


def test_the_callers_traceparent_is_continued() -> None:
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    app = Observe(Starlette(routes=[Route("/x", lambda _: JSONResponse({}))]))
    TestClient(app).get("/x", headers={"traceparent": caller})
    (span,) = _EXPORTER.get_finished_spans()
    assert f"{span.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"


def test_a_record_without_context_starts_no_trace_except_where_mail_enters() -> None:
    assert hop([], "mail.events") == [("other", b"1")]
    assert _EXPORTER.get_finished_spans() == ()
    with tracing.consume_span("mail.submit", None, "submit", root=True):
        headers = tracing.with_trace_headers(None)
    assert [k for k, _ in headers] == ["traceparent"]
    assert len(_EXPORTER.get_finished_spans()) == 1


def test_a_child_span_only_inside_a_trace() -> None:
    with tracing.span("smtp transaction") as outside:
        assert not outside.is_recording()
    with tracing.consume_span("t", None, "l", root=True), tracing.span("smtp transaction") as s:
        assert s.is_recording()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console, otlp"}, ["console", "otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, []),
    ],
)
def test_the_exporter_comes_from_otel_traces_exporter(
    env: dict[str, str], expected: list[str]
) -> None:
    assert tracing.exporters_from_env(env) == expected


def test_otel_service_name_names_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    tracing.resource.cache_clear()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "mta-eu-1")
    try:
        assert tracing.resource("sender").attributes["service.name"] == "mta-eu-1"
        tracing.resource.cache_clear()
        monkeypatch.delenv("OTEL_SERVICE_NAME")
        assert tracing.resource("sender").attributes["service.name"] == "mailrail-sender"
    finally:
        tracing.resource.cache_clear()
