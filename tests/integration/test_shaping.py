"""Traffic shaping against real servers: quotas, no head-of-line blocking, backoff, pauses."""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from confluent_kafka import Producer

from schemas.api import Content
from schemas.records import (
    BatchRecipient,
    ControlAction,
    ControlCommand,
    DeliveryBatch,
    utc_now,
)
from tests.integration.conftest import Stack, topic, unique
from tests.support.kafka import BOOTSTRAP, EventLog, TopicTail
from tests.support.smtp_server import RunningSmtpServer, SmtpScript, start_smtp_server


def post(stack: Stack, recipients: list[str], subject: str = "s", pool: str | None = None) -> str:
    body: dict[str, Any] = {
        "from": "a@acme.example",
        "to": recipients,
        "subject": subject,
        "text": "t",
    }
    if pool:
        body["pool"] = pool
    with stack.client() as client:
        answer = client.post("/v1/messages", json=body)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def arrival_times(stack: Stack, recipients: set[str]) -> list[float]:
    return sorted(
        m.received_at.timestamp()
        for m in stack.sink.messages
        for r in m.rcpt_tos
        if r in recipients
    )


def delivered(events: EventLog, recipients: set[str]) -> set[str]:
    return {
        e.recipient
        for e in events.events()
        if e.type.value == "delivered" and e.recipient in recipients
    }


def control(scope: str, command: ControlCommand | None) -> None:
    producer = Producer({"bootstrap.servers": BOOTSTRAP})
    value = None if command is None else command.model_dump_json().encode()
    producer.produce(topic("mail.control"), value, key=scope.encode())
    assert producer.flush(10) == 0


def test_quota_paces_a_destination(stack: Stack, events: EventLog) -> None:
    recipients = [unique(f"q{i}", "rated.example") for i in range(20)]
    post(stack, recipients)
    wanted = set(recipients)
    events.wait_for(lambda _: delivered(events, wanted) == wanted, timeout_s=60)
    times = arrival_times(stack, wanted)
    # 4/s with a burst of 4: the last of 20 cannot arrive sooner than 4 s after the first.
    assert times[-1] - times[0] >= (20 - 4) / 4 * 0.9


def test_a_slow_destination_does_not_hold_back_others(stack: Stack, events: EventLog) -> None:
    # A hold goes to the tier that fits its wait: 10s or 1m here.
    retry = TopicTail([topic("mail.retry.10s"), topic("mail.retry.1m")])
    try:
        slow = [unique(f"s{i}", "slow.example") for i in range(30)]
        fast = [unique(f"f{i}", "fast.example") for i in range(30)]
        for start in range(0, 30, 5):
            post(stack, slow[start : start + 5] + fast[start : start + 5])
        fast_set, slow_set = set(fast), set(slow)
        events.wait_for(lambda _: delivered(events, fast_set) == fast_set, timeout_s=30)
        # At 1/s, most of the slow destination's mail is still waiting — in a delay topic.
        assert len(delivered(events, slow_set)) < len(slow_set)
        held = retry.wait_for(
            lambda rs: any(
                b'"held_for":"quota"' in (r.value() or b"")
                and b"slow.example" in (r.value() or b"")
                for r in rs
            ),
            timeout_s=10,
        )
        assert held
    finally:
        retry.stop()


@pytest.fixture
def flaky_sink(stack: Stack) -> Iterator[dict[str, int]]:
    """The sink refuses the first three transactions for flaky.example with a 'slow down' reply."""
    calls = {"refused": 0}
    lock = threading.Lock()

    def replies(address: str) -> str | None:
        if not address.endswith("@flaky.example"):
            return None
        with lock:
            if calls["refused"] < 3:
                calls["refused"] += 1
                return "451 4.7.0 Too many messages, slow down and try again later"
        return None

    original = stack.sink.script
    stack.sink.set_script(SmtpScript(replies=replies), open_connections=True)
    yield calls
    stack.sink.set_script(original, open_connections=True)


def metric(stack: Stack, service: str, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(
        f"{stack.services[service].health_url}/metrics", timeout=5
    ) as answer:
        text = answer.read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_throttling_replies_back_off_then_deliver(
    stack: Stack, events: EventLog, flaky_sink: dict[str, int]
) -> None:
    recipients = [unique(f"t{i}", "flaky.example") for i in range(3)]
    post(stack, recipients)
    wanted = set(recipients)
    events.wait_for(lambda _: delivered(events, wanted) == wanted, timeout_s=60)
    deferred = [e for e in events.events() if e.recipient in wanted and e.type.value == "deferred"]
    assert len(deferred) == 3 and all(e.category == "throttled" for e in deferred)
    assert flaky_sink["refused"] == 3
    deadline = time.monotonic() + 10
    factor = None
    while time.monotonic() < deadline:
        factor = metric(
            stack, "sender", "mailrail_destination_backoff_factor", destination="flaky.example"
        )
        if factor is not None:
            break
        time.sleep(0.5)
    assert factor is not None and factor < 1.0


def test_a_blocking_reply_pauses_the_destination_for_the_pool(
    stack: Stack, events: EventLog
) -> None:
    domain = f"blocked-{uuid.uuid4().hex[:8]}.example"
    scope = f"domain:{domain}@pool:default"
    controls = TopicTail(topic("mail.control"))
    original = stack.sink.script
    stack.sink.set_script(
        SmtpScript(
            replies=lambda a: (
                "554 5.7.1 Service unavailable; client host blocked using zen.spamhaus.org"
                if a.endswith("@" + domain)
                else None
            )
        ),
        open_connections=True,
    )
    try:
        first = unique("b1", domain)
        post(stack, [first])
        events.wait_types(first, {"bounced"})
        records = controls.wait_for(
            lambda rs: any(r.key() == scope.encode() for r in rs), timeout_s=10
        )
        pause = ControlCommand.model_validate_json(
            next(r.value() for r in records if r.key() == scope.encode()) or b""
        )
        assert pause.action is ControlAction.PAUSE and "spamhaus" in (pause.reason or "")
        stack.sink.set_script(original, open_connections=True)
        second = unique("b2", domain)
        post(stack, [second])
        time.sleep(4)
        assert not stack.sink.messages_for(second), "a paused destination was mailed"
        assert not [
            e for e in events.events(second) if e.type.value in ("delivered", "deferred", "bounced")
        ]
        control(scope, None)
        events.wait_types(second, {"delivered"}, timeout_s=30)
    finally:
        stack.sink.set_script(original, open_connections=True)
        control(scope, None)
        controls.stop()


def test_operator_pause_and_resume_within_seconds(stack: Stack, events: EventLog) -> None:
    domain = f"paused-{uuid.uuid4().hex[:8]}.example"
    scope = f"domain:{domain}@pool:default"
    control(scope, ControlCommand(scope=scope, action=ControlAction.PAUSE, reason="test"))
    try:
        time.sleep(2)  # senders obey a control within 2 s
        held = unique("p", domain)
        post(stack, [held])
        time.sleep(4)
        assert not stack.sink.messages_for(held)
        control(scope, None)
        events.wait_types(held, {"delivered"}, timeout_s=20)
    finally:
        control(scope, None)


def test_quota_override_from_mail_control(stack: Stack, events: EventLog) -> None:
    domain = f"override-{uuid.uuid4().hex[:8]}.example"
    scope = f"domain:{domain}"
    control(scope, ControlCommand(scope=scope, action=ControlAction.QUOTA, messages_per_s=2))
    try:
        time.sleep(2)
        recipients = [unique(f"o{i}", domain) for i in range(8)]
        post(stack, recipients)
        wanted = set(recipients)
        events.wait_for(lambda _: delivered(events, wanted) == wanted, timeout_s=60)
        times = arrival_times(stack, wanted)
        assert times[-1] - times[0] >= (8 - 2) / 2 * 0.9
    finally:
        control(scope, None)


def test_retry_timing_follows_the_schedule(stack: Stack, events: EventLog) -> None:
    later = unique("defer", "retry-timing.example")
    post(stack, [later])
    seen = events.wait_types(later, {"expired"}, timeout_s=60)
    attempts = [e for e in seen if e.type.value in ("deferred", "expired")]
    assert [e.attempt for e in attempts] == list(range(1, len(attempts) + 1))
    gaps = [(b.ts - a.ts).total_seconds() for a, b in itertools.pairwise(attempts)]
    # Schedule [1, 1, 1] s with 10% jitter; the router re-routes when due, never early.
    assert gaps and all(gap >= 0.9 for gap in gaps)


def _json(value: bytes | None) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(value or b"{}")
    return result


@pytest.fixture
def own_mx(stack: Stack) -> Iterator[tuple[str, RunningSmtpServer]]:
    """A domain of the `mxtest` pool whose only MX is a server of its own (127.0.0.8)."""
    domain = f"greet-{uuid.uuid4().hex[:8]}.example"
    server = start_smtp_server("127.0.0.8", stack.mx.port)
    stack.dns.update({domain: {"MX": [(10, f"mx.{domain}")]}, f"mx.{domain}": {"A": ["127.0.0.8"]}})
    try:
        yield domain, server
    finally:
        server.stop()


def test_a_blocking_greeting_pauses_the_destination_and_defers_its_mail(
    stack: Stack, events: EventLog, own_mx: tuple[str, RunningSmtpServer]
) -> None:
    domain, server = own_mx
    scope = f"domain:{domain}@pool:mxtest"
    server.set_script(
        SmtpScript(greeting="554 5.7.1 Service unavailable; client host blocked using Spamhaus")
    )
    controls = TopicTail(topic("mail.control"))
    try:
        first = unique("g1", domain)
        post(stack, [first], pool="mxtest")
        records = controls.wait_for(
            lambda rs: any(r.key() == scope.encode() for r in rs), timeout_s=20
        )
        pause = ControlCommand.model_validate_json(
            next(r.value() for r in records if r.key() == scope.encode()) or b""
        )
        assert pause.action is ControlAction.PAUSE and "Spamhaus" in (pause.reason or "")
        deferred = events.wait_types(first, {"deferred"})
        assert not [e for e in events.events(first) if e.type.value == "bounced"]
        event = next(e for e in deferred if e.type.value == "deferred")
        assert event.smtp is not None and event.smtp.code == 554
        assert event.category == "spam-blocked" and "paused" in (event.detail or "")
        server.set_script(SmtpScript())
        control(scope, None)  # an operator resumes: the held message goes
        events.wait_types(first, {"delivered"}, timeout_s=40)
        assert len(server.messages_for(first)) == 1
    finally:
        control(scope, None)
        controls.stop()


def test_a_slow_down_greeting_backs_the_destination_off(
    stack: Stack, events: EventLog, own_mx: tuple[str, RunningSmtpServer]
) -> None:
    domain, server = own_mx
    server.set_script(SmtpScript(greeting="421 4.7.0 Too many connections, try again later"))
    first = unique("t1", domain)
    post(stack, [first], pool="mxtest")
    events.wait_types(first, {"deferred"})
    # The gauge is set from stats snapshots: one taken before the 421 still says 1.0.
    deadline = time.monotonic() + 15
    factor = None
    while time.monotonic() < deadline and (factor is None or factor >= 1.0):
        factor = metric(
            stack, "sender-mx", "mailrail_destination_backoff_factor", destination=domain
        )
        time.sleep(0.5)
    assert factor is not None and factor < 1.0
    server.set_script(SmtpScript())
    events.wait_types(first, {"delivered"}, timeout_s=30)


def test_a_batch_due_later_than_its_tier_moves_on_instead_of_waiting_in_front(
    stack: Stack, events: EventLog
) -> None:
    """A record waits in a tier at most the tier's delay: a batch due in 25 s written to the
    10 s tier is passed on (to the 10 s tier again, with its remaining wait) until due."""
    rcpt = unique("cascade", "cascade.example")
    written = utc_now()
    batch = DeliveryBatch(
        message_id=f"cascade{uuid.uuid4().hex[:16]}",
        tenant="acme",
        pool="default",
        throttle_key="cascade.example",
        domain="cascade.example",
        from_="a@acme.example",
        content=Content(subject="s", text="t"),
        recipients=[BatchRecipient(email=rcpt, index=0)],
        accepted_at=written,
        not_before=written + timedelta(seconds=25),
        held_for="quota",
    )
    tier = TopicTail(topic("mail.retry.10s"))
    try:
        producer = Producer({"bootstrap.servers": BOOTSTRAP})
        producer.produce(
            topic("mail.retry.10s"), batch.model_dump_json(by_alias=True).encode(), key=b"cascade"
        )
        assert producer.flush(10) == 0
        delivered = events.wait_types(rcpt, {"delivered"}, timeout_s=60)
        at = next(e.ts for e in delivered if e.type.value == "delivered")
        assert at >= written + timedelta(seconds=24)
        copies = [r for r in tier.records() if batch.message_id.encode() in (r.value() or b"")]
        assert len(copies) >= 3  # written once, passed on twice
    finally:
        tier.stop()
