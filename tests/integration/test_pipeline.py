"""The pipeline end to end: HTTP and `mail.submit` in, SMTP out, events and suppression back."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from email import message_from_bytes
from email.policy import default as default_policy
from typing import Any

from confluent_kafka import Producer

from services.bounce.verp import VerpToken, decode_message_id
from tests.integration.conftest import OTHER_KEY, VERP_KEY, Stack, topic, unique
from tests.support.kafka import BOOTSTRAP, EventLog, TopicTail


def post(stack: Stack, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    with stack.client(*([key] if key else [])) as client:
        answer = client.post("/v1/messages", json=body)
    assert answer.status_code == 202, answer.text
    result: dict[str, Any] = answer.json()
    return result


def test_http_message_arrives_with_envelope_headers_and_body(
    stack: Stack, events: EventLog
) -> None:
    alice, bob = unique("alice"), unique("bob")
    answer = post(
        stack,
        {
            "from": "Acme Shop <shop@acme.example>",
            "to": [alice, {"email": bob, "vars": {"first_name": "Bob"}}],
            "subject": "Receipt for {{first_name}} — ünïcode",
            "text": "Hello {{first_name}},\nline two\n.\nend",
            "html": "<p>Hello {{first_name}}</p>",
            "headers": {"X-Campaign": "receipts"},
            "tags": ["receipts"],
        },
    )
    assert [r["status"] for r in answer["recipients"]] == ["queued", "queued"]
    received = stack.sink.wait_for(lambda ms: any(bob in m.rcpt_tos for m in ms), timeout_s=30)
    to_bob = next(m for m in received if bob in m.rcpt_tos)
    assert to_bob.rcpt_tos == [bob]
    assert to_bob.mail_from.endswith("@bounces.mailrail.test")
    parsed = message_from_bytes(to_bob.data, policy=default_policy)
    assert parsed["From"] == "Acme Shop <shop@acme.example>"
    assert parsed["To"] == bob
    assert parsed["Subject"] == "Receipt for Bob — ünïcode"
    assert parsed["X-Campaign"] == "receipts"
    # Signed like the return path, so a report quoting it can be matched to this recipient.
    assert decode_message_id(parsed["Message-ID"], VERP_KEY.encode()) == VerpToken(
        answer["id"], 1, "acme"
    )
    text = parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert text.replace("\r\n", "\n") == "Hello Bob,\nline two\n.\nend\n"
    assert "<p>Hello Bob</p>" in parsed.get_body(("html",)).get_content()  # type: ignore[union-attr]
    delivered = events.wait_types(bob, {"queued", "delivered"})
    final = next(e for e in delivered if e.type.value == "delivered")
    assert final.smtp is not None and final.smtp.code == 250
    assert final.message_id == answer["id"] and final.tenant == "acme" and final.pool == "default"
    events.wait_types(alice, {"delivered"})


def test_kafka_submission_arrives(stack: Stack, events: EventLog) -> None:
    carol = unique("carol")
    raw = (
        b"From: shop@acme.example\r\nTo: "
        + carol.encode()
        + b"\r\nSubject: raw one\r\n\r\nRaw body\r\n"
    )
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "enable.idempotence": True})
    submission = {
        "tenant": "acme",
        "from": "shop@acme.example",
        "to": [carol],
        "raw": base64.b64encode(raw).decode(),
    }
    producer.produce(topic("mail.submit"), json.dumps(submission).encode(), key=b"upstream-1")
    assert producer.flush(10) == 0
    received = stack.sink.wait_for(lambda ms: any(carol in m.rcpt_tos for m in ms), timeout_s=30)
    message = next(m for m in received if carol in m.rcpt_tos)
    assert message.data.replace(b"\r\n", b"\n").endswith(b"Subject: raw one\n\nRaw body\n")
    events.wait_types(carol, {"queued", "delivered"})


def test_mx_resolution_delivers_to_the_mx_hosts_address(stack: Stack, events: EventLog) -> None:
    dave = unique("dave", "mx-routed.example")
    post(
        stack,
        {
            "from": "a@acme.example",
            "to": [dave],
            "subject": "via MX",
            "text": "hi",
            "pool": "mxtest",
        },
    )
    received = stack.mx.wait_for(lambda ms: any(dave in m.rcpt_tos for m in ms), timeout_s=30)
    assert any(dave in m.rcpt_tos for m in received)
    assert not stack.sink.messages_for(dave)
    delivered = [e for e in events.wait_types(dave, {"delivered"}) if e.type.value == "delivered"]
    assert delivered[0].mx == "mx1.mx-routed.example"


def test_nxdomain_bounces_without_connecting(stack: Stack, events: EventLog) -> None:
    erin = unique("erin", "no-such-domain.example")
    post(
        stack,
        {"from": "a@acme.example", "to": [erin], "subject": "s", "text": "t", "pool": "mxtest"},
    )
    bounced = next(e for e in events.wait_types(erin, {"bounced"}) if e.type.value == "bounced")
    assert bounced.smtp is not None and bounced.smtp.enhanced == "5.1.2"
    assert bounced.hard is True and bounced.category == "bad-domain"


def test_hard_bounce_suppresses_the_next_message(stack: Stack, events: EventLog) -> None:
    gone = unique("bounce")
    first = post(stack, {"from": "a@acme.example", "to": [gone], "subject": "1", "text": "t"})
    bounced = next(e for e in events.wait_types(gone, {"bounced"}) if e.type.value == "bounced")
    assert bounced.smtp is not None and bounced.smtp.code == 550
    assert bounced.category == "bad-mailbox" and bounced.hard is True
    assert bounced.message_id == first["id"]
    offered = stack.sink.stats.rcpt_commands

    def suppressed_now() -> bool:
        with stack.client() as client:
            return client.get(f"/v1/suppressions/{gone}").status_code == 200

    _wait(suppressed_now)
    second = post(stack, {"from": "a@acme.example", "to": [gone], "subject": "2", "text": "t"})
    assert second["recipients"] == [{"email": gone, "status": "suppressed"}]
    events.wait_for(
        lambda _: any(
            e.message_id == second["id"] and e.type.value == "suppressed"
            for e in events.events(gone)
        )
    )
    assert not any(e.type.value == "delivered" for e in events.events(gone, str(second["id"])))
    assert stack.sink.stats.rcpt_commands == offered, "a suppressed address was offered again"


def test_soft_failure_is_deferred_retried_and_expires(stack: Stack, events: EventLog) -> None:
    later = unique("defer", "deferring.example")
    post(stack, {"from": "a@acme.example", "to": [later], "subject": "s", "text": "t"})
    seen = events.wait_types(later, {"deferred", "expired"}, timeout_s=60)
    deferred = [e for e in seen if e.type.value == "deferred"]
    assert (
        deferred[0].smtp is not None and deferred[0].smtp.code == 451 and deferred[0].hard is False
    )
    assert len(deferred) >= 2, "a deferral is retried"
    assert [e.attempt for e in deferred] == sorted(e.attempt for e in deferred)
    assert not any(e.type.value in ("delivered", "bounced") for e in seen)


def test_other_tenant_cannot_see_suppressions(stack: Stack) -> None:
    address = unique("private")
    with stack.client() as client:
        assert (
            client.put(f"/v1/suppressions/{address}", json={"reason": "asked"}).status_code == 200
        )
        assert client.get(f"/v1/suppressions/{address}").status_code == 200
    with stack.client(OTHER_KEY) as other:
        assert other.get(f"/v1/suppressions/{address}").status_code == 404
    with stack.client() as client:
        assert client.delete(f"/v1/suppressions/{address}").status_code == 204
        assert client.get(f"/v1/suppressions/{address}").status_code == 404


def test_invalid_submission_lands_in_rejected(stack: Stack, rejected: TopicTail) -> None:
    marker = unique("reject").encode()
    producer = Producer({"bootstrap.servers": BOOTSTRAP})
    producer.produce(
        topic("mail.submit"), b'{"tenant": "acme", "from": "bad", "to": []}', key=marker
    )
    producer.produce(topic("mail.submit"), b"not json at all", key=marker + b"-2")
    assert producer.flush(10) == 0
    records = rejected.wait_for(
        lambda rs: {marker, marker + b"-2"} <= {r.key() for r in rs}, timeout_s=30
    )
    by_key: dict[Any, dict[str, Any]] = {r.key(): dict(r.headers() or []) for r in records}
    assert by_key[marker]["mailrail-error-code"] == b"schema"
    assert by_key[marker]["mailrail-source-topic"] == topic("mail.submit").encode()
    assert by_key[marker + b"-2"]["mailrail-reason"].startswith(b"not a valid Submission")


def _wait(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError("condition not met")
