"""What each destination looks like from this sender: gauges, and snapshots on `mail.stats`.

`DestinationTally` learns from what the sender reads and writes (no hook in the delivery
code): a batch read back from a delay topic (held, or a retry) and every batch written to one,
and each `mail.events` record it writes (outcome counts and the last replies). Every
`interval_s` `StatsPublisher` refreshes the per-destination gauges and writes one
`DestinationStats` per destination whose outbound partition this sender owns (key
`pool/destination`), and a tombstone for one it forgot while it owned it.
"""

import asyncio
import contextlib
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import orjson

from schemas.catalogue import EVENTS, RETRY_TIERS, STATS, outbound_topic, retry_topic
from schemas.records import (
    ControlAction,
    DeliveryBatch,
    DestinationStats,
    LastReply,
    stats_key,
    utc_now,
)
from services.runtime.controls import Controls
from services.runtime.loop import Output
from services.runtime.producer import AsyncProducer
from services.sender import metrics
from services.sender.shaping import Destination

log = logging.getLogger(__name__)

LAST_REPLIES = 5
_OUTCOMES = frozenset({"delivered", "deferred", "bounced", "expired"})


@dataclass
class _Tally:
    partition: int | None = None
    held: int = 0
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    replies: deque[LastReply] = field(default_factory=lambda: deque(maxlen=LAST_REPLIES))


class DestinationTally:
    """Per throttle key: its partition, batches out in delay topics, outcomes, last replies."""

    def __init__(self) -> None:
        self._by_key: dict[str, _Tally] = {}
        self._delay_topics = frozenset(retry_topic(tier) for tier in RETRY_TIERS)

    def get(self, key: str) -> _Tally:
        tally = self._by_key.get(key)
        if tally is None:
            tally = self._by_key[key] = _Tally()
        return tally

    def known(self) -> list[str]:
        return list(self._by_key)

    def forget(self, key: str) -> None:
        self._by_key.pop(key, None)

    def before(self, batch: DeliveryBatch, partition: int | None) -> None:
        """A batch was read from the outbound topic (on `partition`)."""
        tally = self.get(batch.throttle_key)
        tally.partition = partition
        if batch.held_for is not None or batch.attempt > 1:
            tally.held = max(0, tally.held - 1)

    def after(self, batch: DeliveryBatch, outputs: Sequence[Output]) -> None:
        """What delivering the batch wrote."""
        tally = self.get(batch.throttle_key)
        for output in outputs:
            if output.topic in self._delay_topics:
                tally.held += 1
            elif output.topic == EVENTS and output.value is not None:
                self._note_event(tally, output.value)

    @staticmethod
    def _note_event(tally: _Tally, value: bytes) -> None:
        event = orjson.loads(value)
        kind = event.get("type")
        if kind not in _OUTCOMES:
            return
        if kind == "delivered":
            tally.delivered += 1
        elif kind == "deferred":
            tally.deferred += 1
        else:
            tally.bounced += 1
        smtp = event.get("smtp")
        if smtp:
            tally.replies.append(
                LastReply(
                    ts=event.get("ts") or utc_now(),
                    code=smtp["code"],
                    enhanced=smtp.get("enhanced"),
                    text=smtp.get("text", ""),
                    mx=event.get("mx"),
                )
            )


def sender_id() -> str:
    return f"{socket.gethostname()}/{os.getpid()}"


def _applies(parts: dict[str, str], pool: str, key: str) -> bool:
    """A scope that covers the whole destination in this pool (not only one tenant's mail)."""
    if "tenant" in parts or parts.get("pool", pool) != pool:
        return False
    return parts.get("domain", key) == key and parts.get("provider", key) == key


def pause_of(controls: Controls, pool: str, key: str, now: datetime) -> tuple[datetime, str] | None:
    """(until, reason) of the latest pause in force for the destination in this pool."""
    pauses = [c for p, c in controls.in_force(ControlAction.PAUSE, now) if _applies(p, pool, key)]
    if not pauses:
        return None
    latest = max(pauses, key=lambda c: c.expires_at or datetime.max.replace(tzinfo=now.tzinfo))
    return latest.expires_at or datetime.max.replace(tzinfo=now.tzinfo), latest.reason or ""


def override_of(controls: Controls, pool: str, key: str, now: datetime) -> float | None:
    rates = [
        c.messages_per_s
        for p, c in controls.in_force(ControlAction.QUOTA, now)
        if _applies(p, pool, key) and c.messages_per_s is not None
    ]
    return min(rates) if rates else None


@dataclass
class Snapshotter:
    """Builds each destination's `DestinationStats` and sets its gauges."""

    pool: str
    tally: DestinationTally
    controls: Controls
    interval_s: float
    sender: str = field(default_factory=sender_id)

    def stats(
        self, destination: Destination, backlog: dict[int, int], now: datetime
    ) -> DestinationStats:
        tally = self.tally.get(destination.key)
        pause = pause_of(self.controls, self.pool, destination.key, now)
        return DestinationStats(
            pool=self.pool,
            destination=destination.key,
            sender=self.sender,
            ts=now,
            interval_s=self.interval_s,
            rate_per_s=round(destination.observed_per_s(), 3),
            quota_per_s=destination.effective_rate_per_s(),
            override_per_s=override_of(self.controls, self.pool, destination.key, now),
            backoff_factor=destination.state.factor,
            throttled=destination.state.throttled,
            connections_in_use=destination.concurrency.in_use,
            max_connections=destination.concurrency.limit,
            in_progress=destination.waiting,
            held=tally.held,
            partition=tally.partition,
            partition_backlog=None if tally.partition is None else backlog.get(tally.partition),
            paused_until=None if pause is None else pause[0],
            pause_reason=None if pause is None else pause[1][:300],
            delivered=tally.delivered,
            deferred=tally.deferred,
            bounced=tally.bounced,
            last_replies=list(tally.replies),
        )

    def set_gauges(self, stats: DestinationStats) -> None:
        labels = (stats.pool, stats.destination)
        metrics.DESTINATION_RATE.labels(*labels).set(stats.rate_per_s)
        metrics.DESTINATION_QUOTA.labels(*labels).set(
            -1 if stats.quota_per_s is None else stats.quota_per_s
        )
        metrics.DESTINATION_OVERRIDE.labels(*labels).set(
            -1 if stats.override_per_s is None else stats.override_per_s
        )
        metrics.DESTINATION_BACKOFF.labels(*labels).set(stats.backoff_factor)
        metrics.DESTINATION_CONCURRENCY.labels(*labels).set(stats.connections_in_use)
        metrics.DESTINATION_MAX_CONNECTIONS.labels(*labels).set(stats.max_connections)
        metrics.DESTINATION_WAITING.labels(*labels).set(stats.in_progress)
        metrics.DESTINATION_HELD.labels(*labels).set(stats.held)
        metrics.DESTINATION_PAUSED.labels(*labels).set(int(stats.paused_until is not None))

    def drop_gauges(self, key: str) -> None:
        for gauge in (
            metrics.DESTINATION_RATE,
            metrics.DESTINATION_QUOTA,
            metrics.DESTINATION_OVERRIDE,
            metrics.DESTINATION_BACKOFF,
            metrics.DESTINATION_CONCURRENCY,
            metrics.DESTINATION_MAX_CONNECTIONS,
            metrics.DESTINATION_WAITING,
            metrics.DESTINATION_HELD,
            metrics.DESTINATION_PAUSED,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(self.pool, key)


@dataclass
class StatsPublisher:
    """Every `interval_s`: gauges, then snapshots of owned destinations on `mail.stats`."""

    snapshotter: Snapshotter
    destinations: Callable[[], list[Destination]]
    #: The outbound partitions this sender owns, with their lag: (topic, partition) → lag.
    owned: Callable[[], dict[tuple[str, int], int | None]]
    open_connections: Callable[[], int]
    producer: AsyncProducer
    _published: set[str] = field(default_factory=set)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.publish_once()
            except Exception:
                log.exception("stats snapshot failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.snapshotter.interval_s)

    async def publish_once(self) -> None:
        snap = self.snapshotter
        now = utc_now()
        topic = outbound_topic(snap.pool)
        owned = self.owned()
        partitions = {p for t, p in owned if t == topic}
        backlog = {p: n for (t, p), n in owned.items() if t == topic and n is not None}
        records: list[tuple[str, bytes | None]] = []
        current = {d.key: d for d in self.destinations()}
        for key, destination in current.items():
            stats = snap.stats(destination, backlog, now)
            snap.set_gauges(stats)
            if stats.partition in partitions:
                records.append((stats_key(snap.pool, key), stats.model_dump_json().encode()))
        for key in snap.tally.known():
            if key not in current:
                snap.drop_gauges(key)
                if snap.tally.get(key).partition in partitions:
                    records.append((stats_key(snap.pool, key), None))
                snap.tally.forget(key)
        metrics.CONNECTIONS_OPEN.labels(snap.pool).set(self.open_connections())
        records = [(k, v) for k, v in records if v is not None or k in self._published]
        self._published.update(k for k, v in records if v is not None)
        self._published.difference_update(k for k, v in records if v is None)
        if records:
            await self.producer.send_all([(STATS, v, k, None) for k, v in records])
