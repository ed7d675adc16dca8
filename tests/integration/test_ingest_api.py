"""Ingest as a client sees it, on the integration stack: bulk, validation, idempotency,
status, tenants, and the OpenAPI document fuzzed with schemathesis."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import schemathesis
from confluent_kafka import Producer
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import (
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration import conftest as stack_conf
from tests.integration.conftest import API_KEY, OTHER_KEY, Stack, unique
from tests.support.kafka import BOOTSTRAP, EventLog, TopicTail
from tests.support.smtp_server import ReceivedMessage

SENDER = "News <news@acme.example>"
#: Per operation and generation mode: 6 operations x 2 modes x 60 stays well under 60 s.
FUZZ_EXAMPLES = 60


def message(to: list[Any], **extra: Any) -> dict[str, Any]:
    return {"from": SENDER, "to": to, "subject": "Hi {{first_name}}", "text": "t", **extra}


def wait_until(check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.2)


def test_bulk_request_with_vars_tags_pool_attachments_and_reply_to(
    stack: Stack, events: EventLog
) -> None:
    to: list[dict[str, Any]] = [
        {"email": unique(f"bulk{i}"), "vars": {"first_name": f"N{i}"}} for i in range(1000)
    ]
    attachment = bytes(range(256)) + b"hello"  # every byte value survives the trip
    tags = ["campaign:spring", "stream:marketing"]
    body = message(
        to,
        text="Dear {{first_name}}, spring is here.",
        html="<p>Dear {{first_name}}, spring is here.</p>",
        pool="default",
        tags=tags,
        reply_to="Help <help@acme.example>",
        headers={"X-Campaign": "spring"},
        attachments=[
            {
                "filename": "a.bin",
                "content_type": "application/octet-stream",
                "content": base64.b64encode(attachment).decode(),
            }
        ],
    )
    with stack.client() as client:
        answer = client.post("/v1/messages", json=body)
    assert answer.status_code == 202, answer.text
    statuses = answer.json()["recipients"]
    assert len(statuses) == 1000 and {s["status"] for s in statuses} == {"queued"}
    assert statuses[7]["email"] == to[7]["email"]
    emails = {r["email"] for r in to}

    def arrived(messages: list[ReceivedMessage]) -> bool:
        return emails <= {r for m in messages for r in m.rcpt_tos}

    stack.sink.wait_for(arrived, timeout_s=120)
    for recipient in to:
        (received,) = stack.sink.messages_for(recipient["email"])
        assert received.rcpt_tos == [recipient["email"]]  # its own copy: its own variables
        mail = received.as_email()
        name = recipient["vars"]["first_name"]
        assert mail["Subject"] == f"Hi {name}"
        assert mail["To"] == recipient["email"]
        assert mail["Reply-To"] == "Help <help@acme.example>"
        assert mail["X-Campaign"] == "spring"
        text, html = mail.get_body(("plain",)), mail.get_body(("html",))
        assert text is not None and html is not None
        assert text.get_content().strip() == f"Dear {name}, spring is here."
        assert html.get_content().strip() == f"<p>Dear {name}, spring is here.</p>"
        (attached,) = list(mail.iter_attachments())
        assert attached.get_filename() == "a.bin"
        assert attached.get_content_type() == "application/octet-stream"
        assert attached.get_content() == attachment
    message_id = answer.json()["id"]

    def all_delivered(_: object) -> bool:
        delivered = {
            e.recipient for e in events.events(message_id=message_id) if e.type.value == "delivered"
        }
        return delivered == emails

    events.wait_for(all_delivered, timeout_s=60)
    delivered = [e for e in events.events(message_id=message_id) if e.type.value == "delivered"]
    assert len(delivered) == 1000 and all(e.tags == tags for e in delivered)
    assert all(e.pool == "default" and e.tenant == "acme" for e in delivered)


@pytest.mark.parametrize(
    ("patch", "code", "field"),
    [
        ({"to": [f"x{i}@example.com" for i in range(1001)]}, "invalid_request", "to"),
        ({"to": []}, "invalid_request", "to"),
        ({"to": ["a@b@example.com"]}, "invalid_request", "to[0]"),
        ({"headers": {"X-A": "a\rb"}}, "invalid_request", "headers"),
        ({"headers": {"X-A": "a\u0000b"}}, "invalid_request", "headers"),
        ({"headers": {"DKIM-Signature": "x"}}, "invalid_request", "headers"),
        ({"reply_to": "x@example.com\nBcc: v@example.com"}, "invalid_request", "reply_to"),
        (
            {"attachments": [{"filename": "a\r\n.txt", "content": ""}]},
            "invalid_request",
            "attachments[0].filename",
        ),
        (
            {"attachments": [{"filename": "a.txt", "content": "%%%"}]},
            "invalid_request",
            "attachments[0].content",
        ),
        (
            {"to": [{"email": "x@example.com", "vars": {"first_name": "a\r\nBcc: v@e.example"}}]},
            "invalid_request",
            "to[0].vars.first_name",
        ),
    ],
)
def test_invalid_requests_name_the_field(
    stack: Stack, patch: dict[str, Any], code: str, field: str
) -> None:
    with stack.client() as client:
        answer = client.post("/v1/messages", json=message(["x@example.com"]) | patch)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == code and answer.json()["error"]["field"] == field


def test_idn_domains_and_utf8_local_parts_are_accepted(stack: Stack) -> None:
    to = [f"jörg-{uuid.uuid4().hex[:6]}@bücher.example", f"用户{uuid.uuid4().hex[:4]}@例子.example"]
    with stack.client() as client:
        answer = client.post("/v1/messages", json=message(to, pool="default"))
    assert answer.status_code == 202, answer.text
    assert [r["email"] for r in answer.json()["recipients"]] == to


def test_a_body_that_is_not_utf8_is_400_naming_the_field(stack: Stack) -> None:
    raw = json.dumps(message(["x@example.com"], text="PLACEHOLDER")).encode()
    with stack.client() as client:
        answer = client.post(
            "/v1/messages",
            content=raw.replace(b"PLACEHOLDER", b"caf\xe9"),
            headers={"Content-Type": "application/json"},
        )
    assert answer.status_code == 400
    assert answer.json()["error"] == {
        "code": "invalid_utf8",
        "message": "text is not valid UTF-8",
        "field": "text",
    }


def test_same_key_same_body_answers_the_first_answer_and_publishes_once(
    stack: Stack, events: EventLog
) -> None:
    rcpt = unique("idem")
    body = message([rcpt])
    key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    with stack.client() as client:
        first = client.post("/v1/messages", json=body, headers=key)
        # The same message spelled differently is the same body.
        again = client.post(
            "/v1/messages",
            content=json.dumps(dict(reversed(body.items())), indent=1),
            headers=key | {"Content-Type": "application/json"},
        )
        other = client.post("/v1/messages", json=message([rcpt], text="changed"), headers=key)
        other_tenant = stack.client(OTHER_KEY).post("/v1/messages", json=body, headers=key)
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    # Keys are per tenant: globex's same key is its own message.
    assert other_tenant.status_code == 202 and other_tenant.json()["id"] != first.json()["id"]
    events.wait_types(rcpt, {"delivered"})
    time.sleep(1)
    accepted = [e for e in events.events(rcpt) if e.type.value == "accepted"]
    assert {e.message_id for e in accepted} == {first.json()["id"], other_tenant.json()["id"]}
    assert len(accepted) == 2


def test_mail_submit_records_with_the_same_key_are_published_once(
    stack: Stack, events: EventLog
) -> None:
    rcpt = unique("submit-idem")
    record = json.dumps(
        message([rcpt]) | {"tenant": "acme", "idempotency_key": f"s-{uuid.uuid4().hex}"}
    ).encode()
    producer = Producer({"bootstrap.servers": BOOTSTRAP})
    topic = getattr(stack_conf, "TOPIC_PREFIX", "") + "mail.submit"
    for _ in range(3):
        producer.produce(topic, record, key=b"same")
    assert producer.flush(10) == 0
    events.wait_types(rcpt, {"delivered"})
    time.sleep(2)
    assert [e.type.value for e in events.events(rcpt)].count("accepted") == 1


def test_mail_submit_records_keyed_only_by_their_record_key_are_published_once(
    stack: Stack, events: EventLog, rejected: TopicTail
) -> None:
    """Without `idempotency_key` in the body, the record key is the idempotency key: the
    same body is published once, another body under that key goes to `mail.rejected`."""
    rcpt, other, third = unique("rk-same"), unique("rk-other"), unique("rk-body-wins")
    key = f"rk-{uuid.uuid4().hex}".encode()
    topic = getattr(stack_conf, "TOPIC_PREFIX", "") + "mail.submit"
    producer = Producer({"bootstrap.servers": BOOTSTRAP})
    same = json.dumps(message([rcpt]) | {"tenant": "acme"}).encode()
    for _ in range(3):
        producer.produce(topic, same, key=key)
    assert producer.flush(10) == 0
    events.wait_types(rcpt, {"accepted"})
    producer.produce(topic, json.dumps(message([other]) | {"tenant": "acme"}).encode(), key=key)
    # A body with its own key is not held to the record key's first body.
    body_key = {"tenant": "acme", "idempotency_key": f"b-{uuid.uuid4().hex}"}
    producer.produce(topic, json.dumps(message([third]) | body_key).encode(), key=key)
    assert producer.flush(10) == 0
    (conflict,) = [
        r for r in rejected.wait_for(lambda rs: any(r.key() == key for r in rs)) if r.key() == key
    ]
    headers = dict(conflict.headers() or [])
    assert headers["mailrail-error-code"] == b"idempotency_conflict"
    assert headers["mailrail-error-field"] == b"key"
    assert headers["mailrail-reason"] == (
        b"the record key (the idempotency key) was used with a different body"
    )
    assert json.loads(conflict.value() or b"")["to"] == [other]
    events.wait_types(rcpt, {"delivered"})
    events.wait_types(third, {"delivered"})
    time.sleep(2)
    assert [e.type.value for e in events.events(rcpt)].count("accepted") == 1
    assert len(stack.sink.messages_for(rcpt)) == 1
    assert not events.events(other) and not stack.sink.messages_for(other)


def test_status_shows_each_recipients_timeline_and_is_per_tenant(
    stack: Stack, events: EventLog
) -> None:
    rcpt = unique("status")
    with stack.client() as client:
        message_id = client.post("/v1/messages", json=message([rcpt])).json()["id"]
        events.wait_types(rcpt, {"delivered"})

        def delivered() -> dict[str, Any] | None:
            answer = client.get(f"/v1/messages/{message_id}")
            body: dict[str, Any] = answer.json()
            return body if answer.status_code == 200 and body["recipients"][0]["final"] else None

        status = wait_until(delivered)
        other = stack.client(OTHER_KEY).get(f"/v1/messages/{message_id}")
        unknown = client.get(f"/v1/messages/{uuid.uuid4().hex}")
        anonymous = httpx.get(f"{stack.url}/v1/messages/{message_id}")
    (recipient,) = status["recipients"]
    assert recipient["email"] == rcpt and recipient["final"] == "delivered"
    kinds = [e["type"] for e in recipient["events"]]
    assert kinds[0] == "accepted" and "queued" in kinds and kinds[-1] == "delivered"
    assert recipient["events"][-1]["smtp"]["code"] == 250
    # Another tenant's message answers exactly like one that does not exist.
    assert other.status_code == unknown.status_code == 404
    assert other.json()["error"]["code"] == unknown.json()["error"]["code"] == "not_found"
    assert anonymous.status_code == 401


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=str)
def test_openapi_fuzz_no_server_errors_and_documented_errors(
    stack: Stack, mode: schemathesis.GenerationMode
) -> None:
    """Every operation of /openapi.json, with schema-valid and schema-invalid inputs: every
    answer's status and body are documented, and none is a 5xx (Kafka is up)."""
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    failures: dict[str, str] = {}
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: Any) -> None:
            response = case.call(headers=auth, timeout=30)
            case.validate_response(response, checks=checks)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert isinstance(error["code"], str) and isinstance(error["message"], str)

        try:
            fuzz()
        except Unsatisfiable:
            continue  # nothing schema-invalid to send (e.g. a free-form string path only)
        except Exception as exc:  # collect every operation's failure, then report them all
            failures[operation.label] = str(exc)[:2000]
    assert not failures, failures
