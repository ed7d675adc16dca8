"""Ingest's pure parts: keys, rate limits, the idempotency rule, timelines, body errors."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.api import MessageRequest
from schemas.records import DeliveryEvent, EventType, IdempotencyRecord, IdempotencyState
from schemas.rules import Rules
from services.ingest.accept import InvalidField, accept, accepted_events, replayed_answer
from services.ingest.auth import ApiKeys, hash_key, hmac_key, tenant_of
from services.ingest.body import parse_body
from services.ingest.errors import ApiError
from services.ingest.idempotency import IdempotencyTable, body_digest
from services.ingest.ratelimit import RateLimiter, parse_rates
from services.ingest.status import timeline

BODY = {"from": "a@acme.example", "to": ["x@y.example"], "subject": "s", "text": "t"}


def request(**extra: object) -> MessageRequest:
    return MessageRequest.model_validate(BODY | extra)


# keys


def test_keys_file_takes_peppered_and_plain_digests(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(
        f"# comment\nacme:hmac-sha256:{hmac_key('k-acme', b'pepper')}\n"
        f"globex:{hash_key('k-globex')}  # plain\n"
    )
    keys = ApiKeys.from_file(path, b"pepper")
    assert keys.tenant_for("k-acme") == "acme" and keys.tenant_for("k-globex") == "globex"
    assert keys.tenant_for("k-other") is None and len(keys) == 2
    assert ApiKeys.from_file(path, b"wrong").tenant_for("k-acme") is None
    with pytest.raises(ValueError, match="PEPPER"):
        ApiKeys.from_file(path)
    path.write_text("acme:md5:abc\n")
    with pytest.raises(ValueError, match=r"keys:1"):
        ApiKeys.from_file(path, b"pepper")


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic k1", "Bearer nope"])
def test_missing_or_unknown_key_is_401(header: str | None) -> None:
    with pytest.raises(ApiError) as error:
        tenant_of(ApiKeys.from_pairs("acme:k1"), header)
    assert error.value.status == 401


# rate limits


def test_bucket_admits_a_burst_then_says_when_to_retry() -> None:
    now = [0.0]
    limiter = RateLimiter(100.0, 1000, {"slow": 10.0}, clock=lambda: now[0])
    assert limiter.take("acme", 1000) == 0.0
    assert limiter.take("acme", 50) == pytest.approx(0.5)
    now[0] = 0.5
    assert limiter.take("acme", 50) == 0.0
    assert limiter.take("slow", 100) == 0.0  # the burst scales with the rate: 100
    assert limiter.take("slow", 20) == pytest.approx(2.0)
    assert RateLimiter.retry_after(0.01) == "1" and RateLimiter.retry_after(2.2) == "3"


def test_a_request_larger_than_the_bucket_passes_when_full_and_leaves_debt() -> None:
    now = [0.0]
    limiter = RateLimiter(10.0, 5, clock=lambda: now[0])
    assert limiter.take("acme", 1000) == 0.0
    assert limiter.take("acme", 1) == pytest.approx(99.6)  # 995 in debt, then 1 token
    now[0] = 100.0
    assert limiter.take("acme", 1) == 0.0


def test_tenant_rates_parse_or_fail_clearly() -> None:
    assert parse_rates("acme:500, globex:2.5") == {"acme": 500.0, "globex": 2.5}
    with pytest.raises(ValueError, match="TENANT_RATES"):
        parse_rates("acme:fast")


# idempotency: every replica applies the same rule to the same log


def _record(state: str, claim: str, at: datetime, lease_s: float = 30.0) -> IdempotencyRecord:
    return IdempotencyRecord(
        tenant="acme",
        key="k",
        state=IdempotencyState(state),
        claim=claim,
        body_sha256="0" * 64,
        message_id="m1",
        first_seen=at,
        lease_s=lease_s,
    )


T0 = datetime(2026, 11, 28, 12, tzinfo=UTC)


def _apply(table: IdempotencyTable, record: IdempotencyRecord, after_s: float) -> None:
    table.apply("acme/k", record, T0.timestamp() + after_s)


def test_first_claim_in_the_log_wins_and_only_its_owner_settles_it() -> None:
    table = IdempotencyTable(max_keys=10)
    _apply(table, _record("pending", "a", T0), 0)
    _apply(table, _record("pending", "b", T0), 0.001)  # the racing replica's claim
    _apply(table, _record("done", "b", T0), 0.002)  # a loser cannot settle it
    entry = table.get("acme/k", T0.timestamp() + 1)
    assert entry is not None and entry.claim == "a" and entry.state is IdempotencyState.PENDING
    _apply(table, _record("done", "a", T0), 0.01)
    entry = table.get("acme/k", T0.timestamp() + 1)
    assert entry is not None and entry.state is IdempotencyState.DONE
    _apply(table, _record("pending", "c", T0), 100)  # done stays done
    assert table.get("acme/k", T0.timestamp() + 100).claim == "a"  # type: ignore[union-attr]


def test_a_dead_claim_is_taken_over_after_its_lease_and_a_released_one_at_once() -> None:
    table = IdempotencyTable(max_keys=10)
    _apply(table, _record("pending", "a", T0, lease_s=30), 0)
    _apply(table, _record("pending", "b", T0), 29)
    assert table.get("acme/k", T0.timestamp() + 29).claim == "a"  # type: ignore[union-attr]
    _apply(table, _record("pending", "b", T0), 31)
    assert table.get("acme/k", T0.timestamp() + 31).claim == "b"  # type: ignore[union-attr]
    _apply(table, _record("released", "b", T0), 32)
    _apply(table, _record("pending", "c", T0), 33)
    assert table.get("acme/k", T0.timestamp() + 33).claim == "c"  # type: ignore[union-attr]


def test_keys_expire_after_the_window_and_memory_is_capped() -> None:
    table = IdempotencyTable(max_keys=2, window_s=100)
    _apply(table, _record("done", "a", T0), 0)
    assert table.get("acme/k", T0.timestamp() + 99) is not None
    assert table.get("acme/k", T0.timestamp() + 100) is None
    for name in ("x", "y", "z"):
        table.apply(f"acme/{name}", _record("done", name, T0), T0.timestamp() + 1)
    assert len(table) == 2 and table.get("acme/x", T0.timestamp() + 1) is None


def test_body_digest_ignores_json_spelling_but_not_content() -> None:
    a = MessageRequest.model_validate_json(
        b'{"from":"a@acme.example","to":["x@y.example"],"subject":"s","text":"t"}'
    )
    b = MessageRequest.model_validate_json(
        b'{ "text": "t", "subject": "s", "to": ["x@y.example"], "from": "a@acme.example" }'
    )
    assert body_digest(a) == body_digest(b) != body_digest(request(text="other"))


def test_replayed_answer_matches_the_first() -> None:
    body = request(to=["x@y.example", "z@y.example"])
    first = accept(body, "acme", Rules(), lambda t, a: a == "z@y.example")
    again = replayed_answer(body, first.id, (1,))
    assert again.model_dump() == {
        "id": first.id,
        "recipients": [
            {"email": "x@y.example", "status": "queued"},
            {"email": "z@y.example", "status": "suppressed"},
        ],
    }


# acceptance


def test_accepted_events_are_delivery_events_for_every_recipient() -> None:
    message = accept(
        request(to=["x@y.example", "z@y.example"], tags=["campaign:spring"]),
        "acme",
        Rules(),
        lambda t, a: False,
    )
    events = [DeliveryEvent.model_validate_json(o.value or b"") for o in accepted_events(message)]
    assert [(e.type, e.recipient, e.message_id, e.tags) for e in events] == [
        (EventType.ACCEPTED, "x@y.example", message.id, ["campaign:spring"]),
        (EventType.ACCEPTED, "z@y.example", message.id, ["campaign:spring"]),
    ]
    assert events[0].ts == message.accepted_at


def test_a_variable_used_in_the_subject_may_not_break_the_line() -> None:
    body = request(
        subject="Hi {{name}}",
        to=[{"email": "x@y.example", "vars": {"name": "a\r\nBcc: v@evil.example"}}],
    )
    with pytest.raises(InvalidField) as error:
        accept(body, "acme", Rules(), lambda t, a: False)
    assert error.value.field == "to[0].vars.name"
    fine = request(text="{{addr}}", to=[{"email": "x@y.example", "vars": {"addr": "1 Road\nTown"}}])
    accept(fine, "acme", Rules(), lambda t, a: False)


# request bodies


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        (
            b'{"from":"a@acme.example","to":["x@y.example"],"subject":"s","text":"\\ud800"}',
            "invalid_utf8",
            "text",
        ),
        (
            b'{"from":"a@acme.example","to":[{"email":"x@y.example","vars":{"n":"\xff"}}],"subject":"s","text":"t"}',
            "invalid_utf8",
            "to[0].vars.n",
        ),
        (b"\xff\xfe{}", "invalid_utf8", None),
        (b"{nope", "invalid_json", None),
        (
            b'{"from":"a@acme.example","to":["x@y.example","bad"],"subject":"s","text":"t"}',
            "invalid_request",
            "to[1]",
        ),
        (
            b'{"from":"a@acme.example","to":["x@y.example"],"subject":"s","text":"t","headers":{"X-A":"a\\u0000"}}',
            "invalid_request",
            "headers",
        ),
    ],
)
def test_body_errors_name_the_field(body: bytes, code: str, field: str | None) -> None:
    with pytest.raises(ApiError) as error:
        parse_body(MessageRequest, body)
    assert (error.value.status, error.value.detail.code, error.value.detail.field) == (
        400,
        code,
        field,
    )


def test_a_raw_message_header_must_be_utf8() -> None:
    import base64

    raw = base64.b64encode(b"Subject: \xff\xfe\r\n\r\nbody").decode()
    with pytest.raises(ApiError) as error:
        parse_body(
            MessageRequest,
            f'{{"from":"a@acme.example","to":["x@y.example"],"raw":"{raw}"}}'.encode(),
        )
    assert error.value.detail.field == "raw" and "UTF-8" in error.value.detail.message


# status timelines


def test_timeline_per_recipient_with_final_state() -> None:
    def event(kind: str, rcpt: str, minute: int, **extra: object) -> DeliveryEvent:
        return DeliveryEvent.model_validate(
            {
                "type": kind,
                "message_id": "m1",
                "tenant": "acme",
                "recipient": rcpt,
                "ts": T0 + timedelta(minutes=minute),
                **extra,
            }
        )

    status = timeline(
        "m1",
        [
            event("accepted", "x@y.example", 0),
            event("accepted", "z@y.example", 0),
            event("queued", "x@y.example", 1),
            event(
                "deferred",
                "x@y.example",
                2,
                attempt=1,
                smtp={"code": 451, "enhanced": "4.7.1", "text": "later"},
            ),
            event(
                "delivered",
                "x@y.example",
                3,
                attempt=2,
                mx="mx.y.example",
                smtp={"code": 250, "text": "ok"},
            ),
            event("complained", "x@y.example", 9),
            event("suppressed", "z@y.example", 1),
        ],
    )
    x, z = status.recipients
    assert [e.type for e in x.events] == [
        "accepted",
        "queued",
        "deferred",
        "delivered",
        "complained",
    ]
    assert (x.state, x.final) == ("complained", "delivered")
    assert x.events[2].smtp is not None and x.events[2].smtp.code == 451
    assert (z.state, z.final) == ("suppressed", "suppressed")
    assert status.accepted_at == T0
