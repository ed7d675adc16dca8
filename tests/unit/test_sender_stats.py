"""What a sender reports about its destinations, from what it read and wrote (no broker)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest

from schemas.api import Content
from schemas.catalogue import EVENTS, STATS, outbound_topic, retry_topic
from schemas.records import (
    BatchRecipient,
    ControlAction,
    DeliveryBatch,
    DeliveryEvent,
    DestinationStats,
    EventType,
    SmtpReply,
)
from schemas.rules import Backoff, Shaping
from services.ops.commands import Target, build
from services.runtime.codec import encode
from services.runtime.controls import Controls
from services.runtime.loop import Output
from services.sender.shaping import Destination
from services.sender.stats import DestinationTally, Snapshotter, StatsPublisher

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def batch(
    attempt: int = 1, held: Literal["quota", "paused", "busy"] | None = None
) -> DeliveryBatch:
    return DeliveryBatch(
        message_id="m1",
        tenant="acme",
        pool="default",
        throttle_key="gmail",
        domain="gmail.com",
        from_="a@acme.example",
        content=Content(subject="s", text="t"),
        recipients=[BatchRecipient(email="u@gmail.com", index=0)],
        accepted_at=NOW,
        attempt=attempt,
        held_for=held,
    )


def event(kind: EventType, code: int, text: str) -> Output:
    value = DeliveryEvent(
        type=kind,
        message_id="m1",
        tenant="acme",
        recipient="u@gmail.com",
        ts=NOW,
        pool="default",
        mx="mx.gmail",
        smtp=SmtpReply(code=code, text=text),
    )
    return Output(EVENTS, encode(value), "m1")


def test_the_tally_counts_outcomes_held_batches_and_keeps_the_last_replies() -> None:
    tally = DestinationTally()
    tally.before(batch(), partition=3)
    tally.after(
        batch(),
        [
            event(EventType.DELIVERED, 250, "ok"),
            event(EventType.DEFERRED, 451, "later"),
            Output(retry_topic("1m"), b"{}", "gmail"),
        ],
    )
    tally.after(batch(), [event(EventType.BOUNCED, 550, "no such user")])
    counted = tally.get("gmail")
    assert (counted.delivered, counted.deferred, counted.bounced, counted.held) == (1, 1, 1, 1)
    assert [r.code for r in counted.replies] == [250, 451, 550] and counted.partition == 3
    tally.before(batch(attempt=2), partition=3)  # the deferred batch came back
    tally.before(batch(held="paused"), partition=3)  # never below zero
    assert tally.get("gmail").held == 0


def destination(clock: list[float]) -> Destination:
    return Destination(
        "gmail", Shaping(messages_per_s=10, max_connections=8), Backoff(), lambda: clock[0]
    )


def test_a_snapshot_shows_pause_override_backoff_and_partition_backlog() -> None:
    controls = Controls()
    pause = build(
        ControlAction.PAUSE,
        Target("gmail", "default"),
        lasting=timedelta(hours=1),
        reason="blocked",
        now=NOW,
    )
    quota = build(ControlAction.QUOTA, Target("gmail"), rate_per_s=3, now=NOW)
    other_tenant = build(ControlAction.PAUSE, Target("gmail", tenant="globex"), now=NOW)
    for command in (pause, quota, other_tenant):
        controls.apply(command.scope, command)
    tally = DestinationTally()
    tally.before(batch(), partition=5)
    snapshotter = Snapshotter("default", tally, controls, interval_s=5.0, sender="s/1")
    stats = snapshotter.stats(destination([0.0]), {5: 120}, NOW)
    assert stats.paused_until == NOW + timedelta(hours=1) and stats.pause_reason == "blocked"
    assert stats.override_per_s == 3 and stats.quota_per_s == 10  # applied on the next batch
    assert (stats.partition, stats.partition_backlog) == (5, 120)
    assert stats.max_connections == 8 and stats.backoff_factor == 1.0


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, Any, Any]] = []

    async def send_all(self, records: Sequence[tuple[str, bytes | None, Any, Any]]) -> None:
        self.sent.extend(records)


@pytest.mark.asyncio
async def test_only_destinations_on_owned_partitions_are_published_and_forgotten_ones_tombstoned() -> (
    None
):
    tally = DestinationTally()
    tally.before(batch(), partition=1)
    other = batch().model_copy(update={"throttle_key": "yahoo.com"})
    tally.before(other, partition=2)
    clock = [0.0]
    gmail = destination(clock)
    yahoo = Destination("yahoo.com", Shaping(), Backoff(), lambda: clock[0])
    current = [gmail, yahoo]
    producer = FakeProducer()
    publisher = StatsPublisher(
        Snapshotter("default", tally, Controls(), 1.0, "s/1"),
        lambda: current,
        lambda: {(outbound_topic("default"), 1): 7},
        lambda: 2,
        producer,  # type: ignore[arg-type]
    )
    await publisher.publish_once()
    ((topic, value, key, _),) = producer.sent
    assert (topic, key) == (STATS, "default/gmail")
    published = DestinationStats.model_validate_json(value or b"")
    assert published.partition_backlog == 7 and published.sender == "s/1"
    producer.sent.clear()
    current.remove(gmail)  # forgotten when idle
    await publisher.publish_once()
    assert producer.sent == [(STATS, None, "default/gmail", None)]
    producer.sent.clear()
    await publisher.publish_once()
    assert producer.sent == []
