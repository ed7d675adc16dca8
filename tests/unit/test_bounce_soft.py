"""Soft bounces: what counts, the limit within the window, and counting across restarts."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import Message

from schemas.catalogue import SOFT_BOUNCES, SUPPRESSION
from schemas.categories import Category
from schemas.records import DeliveryEvent, EventType, SmtpReply, Suppression, suppression_key
from services.bounce.classify import DEFAULT_CLASSIFIER
from services.bounce.handlers import EventsHandler
from services.bounce.soft import (
    DEFAULT_CATEGORIES,
    SoftBounceCounter,
    SoftBounceHandler,
    Tally,
    is_soft_bounce,
)
from services.runtime.codec import encode

T0 = datetime(2026, 11, 1, tzinfo=UTC)
WEEK = timedelta(days=7)
ADDRESS = "full@example.org"
KEY = suppression_key("acme", ADDRESS)


def soft(
    message_id: str,
    at: datetime = T0,
    address: str = ADDRESS,
    kind: EventType = EventType.BOUNCED,
    reply: tuple[int, str, str] = (452, "4.2.2", "Mailbox full"),
    category: Category | None = Category.QUOTA,
    hard: bool | None = False,
) -> DeliveryEvent:
    code, enhanced, text = reply
    return DeliveryEvent(
        type=kind,
        message_id=message_id,
        tenant="acme",
        recipient=address,
        ts=at,
        smtp=SmtpReply(code=code, enhanced=enhanced, text=text),
        category=category,
        hard=hard,
    )


@pytest.mark.parametrize(
    ("event", "counts"),
    [
        (soft("m1"), True),
        (soft("m1", category=Category.INACTIVE_MAILBOX), True),
        (soft("m1", category=Category.THROTTLED), False),
        (soft("m1", category=Category.SPAM_BLOCKED), False),
        (soft("m1", hard=True, reply=(552, "5.2.2", "full")), False),
        (soft("m1", kind=EventType.DEFERRED), False),
        (soft("m1", kind=EventType.EXPIRED, category=Category.EXPIRED, hard=True), True),
        (
            soft(
                "m1",
                kind=EventType.EXPIRED,
                reply=(451, "4.4.7", "expired while held (paused)"),
                category=Category.EXPIRED,
                hard=True,
            ),
            False,
        ),
        (
            soft(
                "m1",
                kind=EventType.EXPIRED,
                reply=(421, "4.7.0", "Too many connections, try again later"),
                category=Category.EXPIRED,
                hard=True,
            ),
            False,
        ),
    ],
)
def test_what_counts_as_a_soft_bounce(event: DeliveryEvent, counts: bool) -> None:
    assert is_soft_bounce(event, DEFAULT_CATEGORIES, DEFAULT_CLASSIFIER) is counts


def test_the_third_message_within_the_window_suppresses() -> None:
    counter, tally = SoftBounceCounter(3, WEEK, 100), Tally()
    now = T0.timestamp()
    assert counter.add(tally, KEY, soft("m1", T0), now) is None
    assert counter.add(tally, KEY, soft("m1", T0 + timedelta(hours=1)), now) is None, "same message"
    assert counter.add(tally, KEY, soft("m2", T0 + timedelta(days=2)), now) is None
    entry = counter.add(tally, KEY, soft("m3", T0 + timedelta(days=6)), now)
    assert isinstance(entry, Suppression)
    assert (entry.address, entry.reason, entry.source_message_id) == (
        ADDRESS,
        "soft-bounce-limit",
        "m3",
    )
    assert entry.detail == "3 soft bounces within 7 days; last: 452 4.2.2 Mailbox full"
    assert KEY not in tally.addresses, "counting starts over"


def test_bounces_older_than_the_window_do_not_count() -> None:
    counter, tally = SoftBounceCounter(3, WEEK, 100), Tally()
    now = T0.timestamp()
    counter.add(tally, KEY, soft("m1", T0), now)
    counter.add(tally, KEY, soft("m2", T0 + timedelta(days=6)), now)
    assert counter.add(tally, KEY, soft("m3", T0 + timedelta(days=8)), now) is None, "m1 is out"
    assert counter.add(tally, KEY, soft("m4", T0 + timedelta(days=9)), now) is not None


def test_memory_is_bounded() -> None:
    counter, tally = SoftBounceCounter(3, WEEK, max_addresses=50), Tally()
    for i in range(500):
        address = f"u{i}@example.org"
        counter.add(tally, suppression_key("acme", address), soft(f"m{i}", address=address), 0)
    assert len(tally.addresses) == 50
    assert list(tally.addresses)[-1] == suppression_key("acme", "u499@example.org"), "newest kept"
    counter.prune(tally, (T0 + timedelta(days=8)).timestamp())
    assert not tally.addresses, "out of the window: forgotten"


def record(event: DeliveryEvent, offset: int, partition: int = 0) -> Message:
    key = suppression_key(event.tenant, event.recipient)
    return Message(
        topic=SOFT_BOUNCES,
        partition=partition,
        offset=offset,
        key=key.encode(),
        value=encode(event),
    )


class History:
    """The topic as the handler would read it back: partition → [(key, value)] by offset."""

    def __init__(self, records: dict[int, list[DeliveryEvent]]) -> None:
        self.records = records
        self.reads: list[tuple[int, int]] = []

    def __call__(self, partition: int, since_s: float, upto: int) -> Iterable[tuple[str, bytes]]:
        self.reads.append((partition, upto))
        found = self.records.get(partition, [])[:upto]
        return [
            (suppression_key(e.tenant, e.recipient), encode(e))
            for e in found
            if e.ts.timestamp() >= since_s
        ]


async def test_a_restarted_member_counts_on_from_the_topic() -> None:
    """Two soft bounces were counted before a restart; the third, after it, suppresses."""
    earlier = [soft("m1", T0), soft("m2", T0 + timedelta(days=1))]
    history = History({0: earlier})
    handler = SoftBounceHandler(
        SoftBounceCounter(3, WEEK, 100), history, clock=lambda: (T0 + timedelta(days=2)).timestamp()
    )
    (output,) = await handler(record(soft("m3", T0 + timedelta(days=2)), offset=2))
    assert output.topic == SUPPRESSION and output.key == KEY
    assert Suppression.model_validate_json(output.value or b"").reason == "soft-bounce-limit"
    assert history.reads == [(0, 2)]


async def test_records_wait_for_their_partition_to_load_and_stay_in_order() -> None:
    history = History({3: [soft("m1", T0)]})
    handler = SoftBounceHandler(
        SoftBounceCounter(3, WEEK, 100), history, clock=lambda: T0.timestamp()
    )
    results = await asyncio.gather(
        handler(record(soft("m2", T0), offset=1, partition=3)),
        handler(record(soft("m3", T0), offset=2, partition=3)),
        handler(record(soft("m4", T0), offset=3, partition=3)),
    )
    assert [len(r) for r in results] == [0, 1, 0], "the limit is reached by offset 2, not later"
    assert history.reads == [(3, 1)], "loaded once"


async def test_a_jump_in_offsets_reloads_the_partition() -> None:
    """Another member counted this partition in between: our count is stale, read it again."""
    history = History({0: []})
    handler = SoftBounceHandler(
        SoftBounceCounter(3, WEEK, 100), history, clock=lambda: T0.timestamp()
    )
    await handler(record(soft("m1", T0), offset=0))
    history.records[0] = [soft("m1", T0), soft("x", T0, "other@example.org"), soft("m2", T0)]
    (output,) = await handler(record(soft("m3", T0), offset=3))
    assert output.key == KEY and history.reads == [(0, 0), (0, 3)]


async def test_events_handler_routes_each_event() -> None:
    handler = EventsHandler(DEFAULT_CATEGORIES, DEFAULT_CLASSIFIER)

    async def outputs(event: DeliveryEvent) -> list[tuple[str, object]]:
        message = Message(
            topic="mail.events",
            partition=0,
            offset=0,
            key=event.message_id.encode(),
            value=encode(event),
        )
        return [(o.topic, o.key) for o in await handler(message)]

    hard = soft(
        "m1", reply=(550, "5.1.1", "no such user"), category=Category.BAD_MAILBOX, hard=True
    )
    assert await outputs(hard) == [(SUPPRESSION, KEY)]
    assert await outputs(soft("m1")) == [(SOFT_BOUNCES, KEY)]
    assert await outputs(soft("m1", kind=EventType.DELIVERED, reply=(250, "2.0.0", "ok"))) == []
    broken = soft("m1", address="nosuchuser@localhost", category=Category.BAD_MAILBOX, hard=True)
    assert await outputs(broken) == [], "an address we could never have mailed: no suppression"
