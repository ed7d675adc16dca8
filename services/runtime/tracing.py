"""Traces: one per message, from the HTTP request to the bounce service, across Kafka.

The W3C `traceparent` (and `tracestate`) travel in Kafka record headers. The consumer loop
runs each record's handler inside a span whose parent is the context in the record's headers
(`consume_span`); `AsyncProducer` adds the current context to every record it writes
(`with_trace_headers`), so whatever a record causes stays in its trace.

The exporter is chosen by the standard variables, read once at start (`configure`):
`OTEL_TRACES_EXPORTER` = `none` (default) | `console` (one JSON line per span on stdout) |
`otlp` (OTLP over HTTP/protobuf: `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_HEADERS`, ...); also
`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_BSP_*`
and `OTEL_SDK_DISABLED`. With `none` no span is recorded, but a `traceparent` that arrives is
passed on unchanged, so a trace crosses a service that does not export.
"""

import functools
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_PROPAGATOR = TraceContextTextMapPropagator()
_TRACER_NAME = "mailrail"
KafkaHeaders = Sequence[tuple[str, str | bytes | None]]
#: What a consumed record's `headers()` may be.
RecordHeaders = KafkaHeaders | dict[str, str | bytes | None] | None


class _HeaderGetter(Getter[KafkaHeaders]):
    def get(self, carrier: KafkaHeaders, key: str) -> list[str] | None:
        values = [
            v.decode("latin-1") if isinstance(v, bytes) else v
            for k, v in carrier
            if k == key and v is not None
        ]
        return values or None

    def keys(self, carrier: KafkaHeaders) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _HeaderGetter()


def exporters_from_env(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The exporters `OTEL_TRACES_EXPORTER` names (comma-separated), none when disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "none").split(",")]
    return [n for n in names if n and n != "none"]


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter(
            out=sys.stdout, formatter=lambda span: span.to_json(indent=None) + "\n"
        )
    if name == "otlp":
        protocol = os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        )
        if protocol != "http/protobuf":
            log.warning("only OTLP over http/protobuf is built in", extra={"asked": protocol})
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console, none)")


@functools.cache
def resource(service: str) -> Resource:
    """The process's resource, shared by traces and metrics (one `service.instance.id`);
    `OTEL_SERVICE_NAME` names the service if set, else `mailrail-<service>`."""
    name = os.environ.get("OTEL_SERVICE_NAME") or f"mailrail-{service}"
    return Resource.create({"service.name": name})


def configure(service: str) -> TracerProvider | None:
    """Install the tracer provider the environment asks for; None when tracing is off."""
    names = exporters_from_env()
    if not names:
        return None
    provider = TracerProvider(resource=resource(service))
    for name in names:
        exporter = _exporter(name)
        processor = (
            SimpleSpanProcessor(exporter) if name == "console" else BatchSpanProcessor(exporter)
        )
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    log.info("tracing on", extra={"exporters": names})
    return provider


def shutdown(provider: TracerProvider | None) -> None:
    """Export what is left (bounded by the processors' own timeouts)."""
    if provider is not None:
        provider.shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer(_TRACER_NAME)


def context_from_headers(headers: RecordHeaders) -> Context | None:
    """The trace context a record carries, or None."""
    if isinstance(headers, dict):
        headers = list(headers.items())
    if not headers or not any(k == TRACEPARENT for k, _ in headers):
        return None
    return _PROPAGATOR.extract(headers, getter=_GETTER)


def context_from_http(headers: Mapping[str, str]) -> Context:
    return _PROPAGATOR.extract(headers)


def with_trace_headers(
    headers: Sequence[tuple[str, bytes]] | None,
) -> list[tuple[str, str | bytes | None]]:
    """The headers plus the current trace context (unless they carry one already)."""
    result: list[tuple[str, str | bytes | None]] = list(headers or ())
    context = trace.get_current_span().get_span_context()
    if not context.is_valid or any(k == TRACEPARENT for k, _ in result):
        return result
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    result += [(k, v.encode("latin-1")) for k, v in carrier.items()]
    return result


@contextmanager
def consume_span(
    topic: str,
    headers: RecordHeaders,
    loop: str,
    key: str | bytes | None = None,
    root: bool = False,
) -> Iterator[Span]:
    """The span of one consumed record, child of the context in its headers.

    A record without a trace context starts a trace only if `root` (where messages enter
    the pipeline: `mail.submit`); otherwise it gets no span (nothing would join it), and the
    records it causes carry no `traceparent`.
    """
    parent = context_from_headers(headers)
    if parent is None and not root:
        yield trace.INVALID_SPAN
        return
    with tracer().start_as_current_span(
        f"{topic} process",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "kafka",
            "messaging.destination.name": topic,
            "messaging.consumer.group.name": loop,
            "messaging.kafka.message.key": key.decode("utf-8", "replace")
            if isinstance(key, bytes)
            else key or "",
        },
    ) as span:
        yield span


@contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
    """A child span of the current one (recorded only inside a trace)."""
    if not trace.get_current_span().get_span_context().is_valid:
        yield trace.INVALID_SPAN
        return
    with tracer().start_as_current_span(name, attributes=dict(attributes or {})) as child:
        yield child


def fail(current: Span, description: str) -> None:
    current.set_status(Status(StatusCode.ERROR, description))
