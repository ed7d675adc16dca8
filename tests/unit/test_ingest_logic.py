from pathlib import Path
from typing import cast

import orjson
import pytest
from confluent_kafka import Message

from schemas.api import MessageRequest
from schemas.records import DeliveryEvent, EventType, Submission
from schemas.rules import Rules, RulesError, load_rules
from services.bounce.suppress import suppression_for
from services.ingest.accept import UnknownPool, accept, answer
from services.ingest.auth import ApiKeys, hash_key
from services.ingest.errors import field_name
from services.ingest.publish import KeyConflict, Publisher
from services.ingest.submit import SubmitHandler, SubmitKey, submit_key
from services.runtime.loop import BadRecord


def request(**extra: object) -> MessageRequest:
    return MessageRequest.model_validate(
        {
            "from": "a@acme.example",
            "to": ["x@y.example", "z@y.example"],
            "subject": "s",
            "text": "t",
            **extra,
        }
    )


def test_accept_marks_suppressed_recipients_and_picks_the_default_pool() -> None:
    accepted = accept(request(), "acme", Rules(), lambda t, a: a == "z@y.example")
    assert accepted.pool == "default" and accepted.tenant == "acme" and len(accepted.id) == 32
    assert [(r.email, r.status) for r in answer(accepted).recipients] == [
        ("x@y.example", "queued"),
        ("z@y.example", "suppressed"),
    ]
    with pytest.raises(UnknownPool):
        accept(request(pool="nope"), "acme", Rules(), lambda t, a: False)


def test_api_keys_from_pairs_and_hashed_file(tmp_path: Path) -> None:
    keys = ApiKeys.from_pairs("acme:k1, globex:k2")
    assert keys.tenant_for("k1") == "acme" and keys.tenant_for("k2") == "globex"
    assert keys.tenant_for("k3") is None
    hashed = tmp_path / "keys"
    hashed.write_text(f"# tenant:sha256\ninitech:{hash_key('secret')}\n")
    assert ApiKeys.from_file(hashed).tenant_for("secret") == "initech"
    with pytest.raises(ValueError, match="tenant"):
        ApiKeys.from_pairs("Bad Tenant:k")
    with pytest.raises(ValueError, match="tenant:key"):
        ApiKeys.from_pairs("nokey")


def test_field_names_are_readable() -> None:
    assert field_name(("body", "to", 0, "Recipient", "email")) == "to[0].email"
    assert field_name(("body",)) is None


def test_rules_file_errors_name_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("pools:\n  - name: Bad Name\n")
    with pytest.raises(RulesError, match=r"line 2: pools\.0\.name"):
        load_rules(path)
    path.write_text(
        "default_pool: default\npools:\n  - name: default\n"
        "domains:\n  gmail.com:\n    messages_per_s: fast\n"
    )
    with pytest.raises(
        RulesError, match=r"rules\.yaml: line 6: domains\.gmail\.com\.messages_per_s"
    ):
        load_rules(path)
    path.write_text("default_pool: other\n")
    with pytest.raises(RulesError, match="default_pool"):
        load_rules(path)


@pytest.mark.parametrize(
    ("kind", "category", "hard", "suppresses"),
    [
        ("bounced", "bad-mailbox", True, True),
        ("bounced", "bad-domain", True, True),
        ("bounced", "policy", True, False),
        ("bounced", "spam-blocked", True, False),
        ("deferred", "quota", False, False),
        ("complained", None, None, True),
        ("unsubscribed", None, None, True),
        ("delivered", None, None, False),
    ],
)
def test_which_events_suppress(
    kind: str, category: str | None, hard: bool | None, suppresses: bool
) -> None:
    event = DeliveryEvent(
        type=EventType(kind),
        message_id="m",
        tenant="acme",
        recipient="x@y.example",
        category=category,
        hard=hard,
    )
    assert (suppression_for(event) is not None) is suppresses


def submission(**extra: object) -> Submission:
    return Submission.model_validate(
        {"tenant": "acme", "from": "a@acme.example", "to": ["x@y.example"], "subject": "s"}
        | {"text": "t", **extra}
    )


@pytest.mark.parametrize(
    ("extra", "record_key", "expected"),
    [
        ({}, None, None),
        ({}, b"", None),
        ({}, b"order-1", SubmitKey("order-1", "key")),
        ({}, "order-1", SubmitKey("order-1", "key")),
        ({}, "ключ-1".encode(), SubmitKey("ключ-1", "key")),
        ({"idempotency_key": "body-1"}, None, SubmitKey("body-1", "idempotency_key")),
        # Both: the body's field wins, the record key only partitions.
        ({"idempotency_key": "body-1"}, b"order-1", SubmitKey("body-1", "idempotency_key")),
        ({"idempotency_key": "body-1"}, b"\xff\xfe", SubmitKey("body-1", "idempotency_key")),
    ],
)
def test_submit_key_is_the_bodys_field_else_the_record_key(
    extra: dict[str, object], record_key: bytes | str | None, expected: SubmitKey | None
) -> None:
    assert submit_key(submission(**extra), record_key) == expected


@pytest.mark.parametrize(
    ("extra", "record_key", "field", "why"),
    [
        # An empty key would fail the idempotency record's validation on every retry.
        ({"idempotency_key": ""}, b"order-1", "idempotency_key", "empty"),
        ({}, b"\xff\xfe", "key", "not valid UTF-8"),
        ({}, b"k" * 201, "key", "longer than 200"),
    ],
)
def test_a_key_that_cannot_be_an_idempotency_key_rejects_the_record(
    extra: dict[str, object], record_key: bytes, field: str, why: str
) -> None:
    with pytest.raises(BadRecord, match=why) as info:
        submit_key(submission(**extra), record_key)
    assert info.value.code == "invalid_request" and info.value.field == field
    assert submit_key(submission(), b"k" * 200) == SubmitKey("k" * 200, "key")


class _ConflictingPublisher:
    """Answers the first key it sees, then `KeyConflict` for that key with another body."""

    timeout_s = 1.0

    def __init__(self) -> None:
        self.first: dict[str, str] = {}
        self.published: list[tuple[str, str | None]] = []

    async def publish(
        self, request: MessageRequest, tenant: str, key: str | None, wait_s: float
    ) -> None:
        body = request.model_dump_json()
        if key is not None and self.first.setdefault(key, body) != body:
            raise KeyConflict
        self.published.append((tenant, key))


def record(value: dict[str, object], key: bytes | None) -> Message:
    body = {"tenant": "acme", "from": "a@acme.example", "subject": "s", "text": "t"} | value
    return Message(topic="mail.submit", partition=0, offset=1, key=key, value=orjson.dumps(body))


async def test_a_record_key_reused_with_another_body_is_rejected_like_http_409() -> None:
    publisher = _ConflictingPublisher()
    handler = SubmitHandler(cast(Publisher, publisher), 1_000_000, lease_s=1.0)
    assert await handler(record({"to": ["x@y.example"]}, b"order-1")) == []
    assert await handler(record({"to": ["x@y.example"]}, b"order-1")) == []
    with pytest.raises(BadRecord) as info:
        await handler(record({"to": ["other@y.example"]}, b"order-1"))
    assert info.value.code == "idempotency_conflict" and info.value.field == "key"
    assert "record key" in info.value.reason and "different body" in info.value.reason
    # Under the body's own key, the conflict names that field.
    body_key: dict[str, object] = {"idempotency_key": "order-1", "to": ["third@y.example"]}
    with pytest.raises(BadRecord) as info:
        await handler(record(body_key, b"whatever"))
    assert info.value.field == "idempotency_key"
    assert publisher.published == [("acme", "order-1"), ("acme", "order-1")]
