"""One trace per message, across processes: HTTP request → ingest → router → sender (a span
per SMTP transaction) → bounce, exported over OTLP/HTTP to the test's receiver."""

from __future__ import annotations

from tests.integration.conftest import Stack, unique
from tests.support.kafka import EventLog
from tests.support.otlp import ReceivedSpan


def _trace_of_message(spans: list[ReceivedSpan], message_id: str) -> str | None:
    for span in spans:
        if (
            span.service == "mailrail-router"
            and span.name.endswith("mail.accepted process")
            and span.attributes.get("messaging.kafka.message.key") == message_id
        ):
            return span.trace_id
    return None


def _complete(spans: list[ReceivedSpan], message_id: str) -> bool:
    trace_id = _trace_of_message(spans, message_id)
    if trace_id is None:
        return False
    names = {(s.service, s.name) for s in spans if s.trace_id == trace_id}
    return ("mailrail-sender", "smtp transaction") in names and any(
        service == "mailrail-bounce" for service, _ in names
    )


def test_a_message_is_one_trace_from_http_to_the_bounce_service(
    stack: Stack, events: EventLog
) -> None:
    recipient = unique("traced", "traced.example")
    with stack.client() as client:
        answer = client.post(
            "/v1/messages",
            json={"from": "a@acme.example", "to": [recipient], "subject": "s", "text": "t"},
        )
    assert answer.status_code == 202, answer.text
    message_id = answer.json()["id"]
    events.wait_types(recipient, {"delivered"})
    spans = stack.traces.wait_for(lambda s: _complete(s, message_id), timeout_s=30)
    trace_id = _trace_of_message(spans, message_id)
    trace = [s for s in spans if s.trace_id == trace_id]
    by_service = {s.service for s in trace}
    assert {
        "mailrail-ingest",
        "mailrail-router",
        "mailrail-sender",
        "mailrail-bounce",
    } <= by_service

    root = [s for s in trace if not s.parent_id]
    assert [(s.service, s.name) for s in root] == [("mailrail-ingest", "POST /v1/messages")]
    ids = {s.span_id for s in trace}
    assert all(s.parent_id in ids for s in trace if s.parent_id), "a span lost its parent"

    smtp = next(s for s in trace if s.name == "smtp transaction")
    assert smtp.attributes["server.address"]
    assert smtp.attributes["smtp.reply.code"] == 250
    assert smtp.attributes["smtp.recipients"] == 1
    assert 0 < smtp.duration_s < 30
    sender_batch = next(s for s in trace if s.span_id == smtp.parent_id)
    assert sender_batch.service == "mailrail-sender"
    assert sender_batch.name.endswith("mail.outbound.default process")
