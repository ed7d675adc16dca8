"""N soft bounces of one address within a window suppress it.

Where the count lives: `mail.events` is keyed by message id, so one address's soft bounces
arrive on many partitions, at many bounce-service members. The events handler therefore
re-keys each soft bounce by `tenant/address` onto `mail.soft-bounces`, and a second consumer
group counts that topic: every address's bounces land on one partition, owned by one member,
which counts them alone and in order.

The count of a partition is memory only, rebuilt from the topic itself: the first time a
partition's record is seen (start, rebalance) or when its offsets jump (another member
counted in between), the member reads that partition from `now - window` up to the record
and folds those records in without emitting anything (whoever counted them then did). The
topic's retention (30 days) bounds the window.

What counts (`is_soft_bounce`): a message that finally failed for a reason that was not
permanent — `bounced` with `hard: false` (an asynchronous DSN with a 4.x.x status) or
`expired` (retried until `MAILRAIL_MAX_AGE_S`) — whose category says something about the
address (mailbox full, inactive, unknown, routing, transient by default; never a block,
policy, throttling or content rejection, which are about the sender). Deferrals are not
counted: one message's retries are one soft bounce at most. The same message counts once.

Memory stays bounded: per partition at most `max_addresses` addresses, least recently
bounced forgotten first (a forgotten address only starts counting again), each with at most
`limit` timestamps; addresses whose last bounce left the window are dropped as the clock
moves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from pydantic import ValidationError

from schemas.catalogue import SOFT_BOUNCES
from schemas.categories import Category
from schemas.records import (
    DeliveryEvent,
    EventType,
    Suppression,
    SuppressionReason,
    suppression_key,
)
from services.bounce import metrics
from services.bounce.classify import Classifier
from services.runtime.codec import decode, suppression_output
from services.runtime.loop import Output

log = logging.getLogger(__name__)

DEFAULT_CATEGORIES = frozenset(
    {
        Category.QUOTA,
        Category.INACTIVE_MAILBOX,
        Category.BAD_MAILBOX,
        Category.BAD_DOMAIN,
        Category.ROUTING,
        Category.TRANSIENT,
    }
)
PRUNE_EVERY = 1000
LOAD_BATCH = 500
LOAD_POLL_S = 1.0


def is_soft_bounce(
    event: DeliveryEvent, categories: frozenset[Category], rules: Classifier
) -> bool:
    if not event.tenant or not event.recipient:
        return False
    if event.type is EventType.BOUNCED and event.hard is False:
        return event.category in categories
    if event.type is EventType.EXPIRED and event.smtp is not None:
        smtp = event.smtp
        return rules.classify(smtp.code, smtp.enhanced, smtp.text).category in categories
    return False


def soft_bounce_output(event: DeliveryEvent, raw: bytes) -> Output:
    """The event as it is counted: the same bytes, keyed by tenant and address."""
    return Output(SOFT_BOUNCES, raw, suppression_key(event.tenant, event.recipient))


@dataclass
class Tally:
    """One partition's addresses: key → [(event time in s, message id)], oldest first."""

    addresses: OrderedDict[str, list[tuple[float, str]]] = field(default_factory=OrderedDict)
    seen: int = 0


class SoftBounceCounter:
    """Pure counting: feed events in partition order, get a suppression at the limit."""

    def __init__(self, limit: int, window: timedelta, max_addresses: int) -> None:
        self.limit = limit
        self.window_s = window.total_seconds()
        self.max_addresses = max_addresses

    def add(self, tally: Tally, key: str, event: DeliveryEvent, now_s: float) -> Suppression | None:
        ts = event.ts.timestamp()
        bounces = [b for b in tally.addresses.pop(key, []) if b[0] > ts - self.window_s]
        if any(message_id == event.message_id for _, message_id in bounces):
            tally.addresses[key] = bounces  # the same message again: counted already
            return None
        bounces.append((ts, event.message_id))
        tally.seen += 1
        if tally.seen % PRUNE_EVERY == 0:
            self.prune(tally, now_s)
        if len(bounces) >= self.limit:
            return self._suppression(event, bounces)
        tally.addresses[key] = bounces[-self.limit :]
        while len(tally.addresses) > self.max_addresses:
            tally.addresses.popitem(last=False)
        return None

    def prune(self, tally: Tally, now_s: float) -> None:
        """Forget addresses whose last soft bounce is out of the window."""
        horizon = now_s - self.window_s
        stale = [k for k, bounces in tally.addresses.items() if bounces[-1][0] <= horizon]
        for key in stale:
            del tally.addresses[key]

    def _suppression(
        self, event: DeliveryEvent, bounces: list[tuple[float, str]]
    ) -> Suppression | None:
        last = ""
        if event.smtp is not None:
            parts = (str(event.smtp.code), event.smtp.enhanced, event.smtp.text)
            last = "; last: " + " ".join(p for p in parts if p)
        days = self.window_s / 86400
        try:
            return Suppression(
                tenant=event.tenant,
                address=event.recipient,
                reason=SuppressionReason.SOFT_BOUNCE_LIMIT,
                created_at=event.ts,
                source_message_id=event.message_id,
                source_event=event.type,
                detail=f"{len(bounces)} soft bounces within {days:g} days{last}"[:500],
            )
        except ValidationError:
            log.warning("soft-bounce limit for an invalid address", extra={"key": event.recipient})
            return None


#: Reads a partition's records from a time up to (not including) an offset.
History = Callable[[int, float, int], Iterable[tuple[str, bytes]]]


@dataclass
class _Partition:
    expected: int
    tally: Tally = field(default_factory=Tally)
    loading: asyncio.Future[None] | None = None


class SoftBounceHandler:
    """Consumer-loop handler of `mail.soft-bounces`: counts, and suppresses at the limit.

    The loop starts records' handlers in offset order; each handler updates the count
    synchronously (no await between check and update), so a partition is counted in order.
    A (re)load makes that partition's later records wait until it is done.
    """

    def __init__(
        self, counter: SoftBounceCounter, history: History, clock: Callable[[], float] = time.time
    ) -> None:
        self._counter = counter
        self._history = history
        self._clock = clock
        self._partitions: dict[int, _Partition] = {}

    async def __call__(self, message: Message) -> Sequence[Output]:
        partition, offset = int(message.partition() or 0), int(message.offset() or 0)
        state = self._partitions.get(partition)
        if state is None or (state.loading is None and offset != state.expected):
            state = self._partitions[partition] = _Partition(offset)
            state.loading = asyncio.ensure_future(self._load(partition, offset, state))
        if state.loading is not None:
            await asyncio.shield(state.loading)
        state.expected = offset + 1
        event = decode(DeliveryEvent, message)
        key = (message.key() or b"").decode(errors="replace")
        entry = self._counter.add(state.tally, key, event, self._clock())
        metrics.SOFT_BOUNCES.inc()
        metrics.SOFT_TRACKED.labels(str(partition)).set(len(state.tally.addresses))
        if entry is None:
            return []
        metrics.SOFT_LIMIT_SUPPRESSIONS.inc()
        log.info(
            "soft-bounce limit reached",
            extra={"tenant": entry.tenant, "address": entry.address, "detail": entry.detail},
        )
        return [suppression_output(entry)]

    async def _load(self, partition: int, upto: int, state: _Partition) -> None:
        started = time.monotonic()
        since_s = self._clock() - self._counter.window_s
        records = await asyncio.to_thread(lambda: list(self._history(partition, since_s, upto)))
        for key, value in records:
            try:
                event = DeliveryEvent.model_validate_json(value)
            except ValidationError:
                continue
            self._counter.add(state.tally, key, event, self._clock())
        state.loading = None
        log.info(
            "soft-bounce counts loaded",
            extra={
                "partition": partition,
                "records": len(records),
                "addresses": len(state.tally.addresses),
                "s": round(time.monotonic() - started, 3),
            },
        )


def kafka_history(config: dict[str, Any], topic: str = SOFT_BOUNCES) -> History:
    """Read a partition of `topic` from a time (s) up to an offset, with a short-lived consumer."""

    def read(partition: int, since_s: float, upto: int) -> Iterable[tuple[str, bytes]]:
        consumer = Consumer(
            config
            | {
                "group.id": f"mailrail-soft-bounce-history-{partition}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )
        try:
            (start,) = consumer.offsets_for_times(
                [TopicPartition(topic, partition, int(since_s * 1000))], timeout=10
            )
            if start.offset < 0 or start.offset >= upto:
                return []
            consumer.assign([TopicPartition(topic, partition, start.offset)])
            found: list[tuple[str, bytes]] = []
            while True:
                for message in consumer.consume(LOAD_BATCH, LOAD_POLL_S):
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            return found
                        raise RuntimeError(f"reading {topic}[{partition}]: {error}")
                    if int(message.offset() or 0) >= upto:
                        return found
                    key, value = message.key(), message.value()
                    if key is not None and value is not None:
                        found.append((key.decode(errors="replace"), value))
                    if int(message.offset() or 0) + 1 >= upto:
                        return found
        finally:
            consumer.close()

    return read
