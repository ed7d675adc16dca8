"""The consume → process → produce → commit loop that every service runs.

Guarantees:
- An offset is committed only after every record its record caused is acknowledged by Kafka.
  Records complete out of order; per partition the loop commits up to the lowest record still
  in flight, so a slow record holds back commits, never other records' work.
- In-flight work is bounded: at `max_in_flight` the loop takes nothing more and waits for a
  record to finish (librdkafka's prefetch, bounded by `queued.max.messages.kbytes`, stays);
  only when none finishes for `PAUSE_AFTER_S` are the partitions paused (the loop keeps
  polling, so the member is never evicted), and resumed when half has drained. A pause
  throws the prefetched records away and costs a fetch round trip on resume: paying that
  on every full window held a sender of one-recipient batches to ~200 records/s.
- Revoke drains the revoked partitions' work and commits it; lost partitions are dropped.
- Shutdown (the `stop` event) stops consuming, drains with a timeout, commits and closes.
- A bad record goes to `mail.rejected` with the reason; an unexpected exception is fatal: the
  loop stops without committing that record, so it is processed again after restart.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from opentelemetry.trace import Span

from schemas.catalogue import REJECTED, SUBMIT
from schemas.records import RejectedHeaders
from services.runtime import lag, metrics, tracing
from services.runtime.consume import take
from services.runtime.health import Health
from services.runtime.producer import DeliveryFailed, Headers, RecordProducer

log = logging.getLogger(__name__)

CONSUME_TIMEOUT_S = 0.2
CONSUME_BATCH = 500
#: How long the loop, at its in-flight limit, waits for a record to finish before it pauses
#: the partitions: far below `max.poll.interval.ms`, and below the liveness timeout.
PAUSE_AFTER_S = 2.0
PRODUCE_RETRY_LIMIT = 5
PRODUCE_RETRY_BASE_S = 0.5
T = TypeVar("T")


@dataclass(frozen=True)
class Output:
    """One record a handler wants written before its input counts as done."""

    topic: str
    value: bytes | None
    key: bytes | str | None = None
    headers: Headers | None = None


class BadRecord(Exception):
    """The record can never be processed: it goes to `mail.rejected` with this reason."""

    def __init__(self, reason: str, code: str = "invalid", field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.field = field


Handler = Callable[[Message], Awaitable[Sequence[Output]]]


def header_list(message: Message) -> list[tuple[str, bytes]]:
    raw: list[tuple[str, bytes | None]] = message.headers() or []  # type: ignore[assignment]
    return [(name, value or b"") for name, value in raw]


def rejected_output(message: Message, error: BadRecord) -> Output:
    headers = header_list(message)
    headers += [
        (RejectedHeaders.REASON, error.reason.encode()),
        (RejectedHeaders.CODE, error.code.encode()),
        (RejectedHeaders.SOURCE_TOPIC, str(message.topic()).encode()),
        (RejectedHeaders.SOURCE_PARTITION, str(message.partition()).encode()),
        (RejectedHeaders.SOURCE_OFFSET, str(message.offset()).encode()),
    ]
    if error.field:
        headers.append((RejectedHeaders.FIELD, error.field.encode()))
    return Output(REJECTED, message.value(), message.key(), headers)


@dataclass
class _PartitionState:
    pending: set[int] = field(default_factory=set)
    next_offset: int = -1
    committed: int = -1
    tasks: set["asyncio.Task[None]"] = field(default_factory=set)

    def commit_point(self) -> int:
        return min(self.pending) if self.pending else self.next_offset


class ConsumerLoop:
    def __init__(
        self,
        *,
        name: str,
        consumer_config: dict[str, Any],
        topics: Sequence[str],
        handler: Handler,
        producer: RecordProducer,
        health: Health,
        max_in_flight: int = 2000,
        commit_interval_s: float = 1.0,
        drain_timeout_s: float = 60.0,
    ) -> None:
        self.name = name
        self._config = consumer_config
        self._topics = list(topics)
        self._handler = handler
        self._producer = producer
        self._health = health
        self._max_in_flight = max_in_flight
        self._commit_interval_s = commit_interval_s
        self._drain_timeout_s = drain_timeout_s
        self._partitions: dict[tuple[str, int], _PartitionState] = {}
        self._in_flight = 0
        self._paused = False
        #: Set whenever a record leaves the in-flight count.
        self._room = asyncio.Event()
        self._fatal: BaseException | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"consumer-{name}")
        self._consumer: Consumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: (topic, partition) → unread records, refreshed every `lag.INTERVAL_S`.
        self.lag: dict[tuple[str, int], int] = {}

    @property
    def paused(self) -> bool:
        """Whether the partitions are paused for back-pressure."""
        return self._paused

    @property
    def assigned(self) -> list[tuple[str, int]]:
        return list(self._partitions)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, then drain, commit and close. Raises a fatal error."""
        self._loop = asyncio.get_running_loop()
        consumer = self._consumer = Consumer(self._config)
        consumer.subscribe(
            self._topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        last_commit = last_lag = time.monotonic()
        try:
            while not stop.is_set() and self._fatal is None:
                if not self._paused and self._in_flight >= self._max_in_flight:
                    await self._wait_for_room()
                room = max(1, min(CONSUME_BATCH, self._max_in_flight - self._in_flight))
                messages = await self._call(take, consumer, room, CONSUME_TIMEOUT_S)
                self._health.beat(self.name)
                for message in messages:
                    self._accept(message)
                await self._resume_if_drained()
                if time.monotonic() - last_commit >= self._commit_interval_s:
                    await self._commit()
                    last_commit = time.monotonic()
                if time.monotonic() - last_lag >= lag.INTERVAL_S:
                    self.lag = await self._call(lag.measure, consumer, self.name)
                    last_lag = time.monotonic()
            await self._drain_all()
        finally:
            if self._fatal is None:
                await self._commit()
            await self._call(consumer.close)
            self._health.forget(self.name)
            self._executor.shutdown(wait=False)
        if self._fatal is not None:
            raise self._fatal

    def _accept(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.fatal():
                self._fatal = KafkaException(error)
            elif error.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error", extra={"loop": self.name, "error": str(error)})
            return
        key = (str(message.topic()), int(message.partition() or 0))
        state = self._partitions.setdefault(key, _PartitionState())
        offset = int(message.offset() or 0)
        state.pending.add(offset)
        state.next_offset = max(state.next_offset, offset + 1)
        self._in_flight += 1
        metrics.IN_FLIGHT.labels(self.name).set(self._in_flight)
        metrics.RECORDS_CONSUMED.labels(self.name, key[0]).inc()
        task = asyncio.create_task(self._process(message, key, offset))
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)

    async def _process(self, message: Message, key: tuple[str, int], offset: int) -> None:
        # Outputs are written inside the span: they carry its context (see tracing.py).
        with tracing.consume_span(
            key[0], message.headers(), self.name, message.key(), root=key[0] == SUBMIT
        ) as span:
            await self._process_in(message, key, offset, span)

    async def _process_in(
        self, message: Message, key: tuple[str, int], offset: int, span: Span
    ) -> None:
        try:
            try:
                outputs: Sequence[Output] = await self._handler(message)
            except BadRecord as bad:
                tracing.fail(span, bad.reason)
                log.warning(
                    "bad record rejected",
                    extra={
                        "loop": self.name,
                        "topic": key[0],
                        "offset": offset,
                        "reason": bad.reason,
                    },
                )
                metrics.RECORDS_REJECTED.labels(self.name, key[0], bad.code).inc()
                outputs = [rejected_output(message, bad)]
            await self._write(outputs)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.exception(
                "fatal error processing record", extra={"loop": self.name, "offset": offset}
            )
            if self._fatal is None:
                self._fatal = exc
            return
        state = self._partitions.get(key)
        if state is not None and offset in state.pending:
            state.pending.discard(offset)
            self._in_flight -= 1
            self._room.set()
            metrics.IN_FLIGHT.labels(self.name).set(self._in_flight)

    async def _write(self, outputs: Sequence[Output]) -> None:
        """Write outputs and wait for every acknowledgement; retry transient failures."""
        for attempt in range(PRODUCE_RETRY_LIMIT):
            try:
                await self._producer.send_all(
                    [(o.topic, o.value, o.key, o.headers) for o in outputs]
                )
                for output in outputs:
                    metrics.RECORDS_PRODUCED.labels(output.topic).inc()
                return
            except DeliveryFailed as failed:
                if failed.fatal or attempt == PRODUCE_RETRY_LIMIT - 1:
                    raise
                log.warning("produce failed, retrying", extra={"error": str(failed)})
                await asyncio.sleep(PRODUCE_RETRY_BASE_S * 2**attempt)

    async def _wait_for_room(self) -> None:
        """At the limit: wait up to PAUSE_AFTER_S for a record to finish; if none does, pause
        (`_pause`), so that the loop goes back to polling."""
        deadline = time.monotonic() + PAUSE_AFTER_S
        while self._in_flight >= self._max_in_flight and self._fatal is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await self._pause()
                return
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), remaining)

    async def _pause(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        self._paused = True
        await self._call(lambda: consumer.pause(consumer.assignment()))
        metrics.PAUSED.labels(self.name).set(1)

    async def _resume_if_drained(self) -> None:
        """Resume paused partitions once half the in-flight limit has drained."""
        consumer = self._consumer
        assert consumer is not None
        if self._paused and self._in_flight <= self._max_in_flight // 2:
            self._paused = False
            await self._call(lambda: consumer.resume(consumer.assignment()))
        metrics.PAUSED.labels(self.name).set(int(self._paused))

    def _offsets_to_commit(
        self, keys: Sequence[tuple[str, int]] | None = None
    ) -> list[TopicPartition]:
        """Each partition's lowest pending record (or next offset); event-loop thread only."""
        offsets = []
        for key in keys if keys is not None else list(self._partitions):
            state = self._partitions.get(key)
            if state is not None and (point := state.commit_point()) > state.committed:
                offsets.append(TopicPartition(key[0], key[1], point))
        return offsets

    def _commit_sync(self, offsets: list[TopicPartition]) -> bool:
        """Consumer thread only."""
        if not offsets:
            return False
        consumer = self._consumer
        assert consumer is not None
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            log.warning("commit failed", extra={"loop": self.name, "error": str(exc)})
            return False
        metrics.COMMITS.labels(self.name).inc()
        return True

    async def _commit(self) -> None:
        offsets = self._offsets_to_commit()
        if await self._call(self._commit_sync, offsets):
            for tp in offsets:
                if (state := self._partitions.get((tp.topic, tp.partition))) is not None:
                    state.committed = max(state.committed, tp.offset)

    async def _drain(self, keys: Sequence[tuple[str, int]]) -> None:
        """Let the partitions' work finish; cancel what outlives the drain timeout.

        Cancelled records stay uncommitted, so the partition's next owner processes them;
        cancelling keeps this member from also finishing them (and writing twice).
        """
        tasks = [t for key in keys if (s := self._partitions.get(key)) for t in s.tasks]
        if tasks:
            _, still_running = await asyncio.wait(tasks, timeout=self._drain_timeout_s)
            if still_running:
                log.warning(
                    "drain timed out, cancelling",
                    extra={"loop": self.name, "left": len(still_running)},
                )
                for task in still_running:
                    task.cancel()
                await asyncio.gather(*still_running, return_exceptions=True)

    async def _drain_all(self) -> None:
        await self._drain(list(self._partitions))

    def _drop(self, keys: Sequence[tuple[str, int]]) -> None:
        lag.forget(self.name, keys)
        for key in keys:
            self.lag.pop(key, None)
            state = self._partitions.pop(key, None)
            if state is not None:
                self._in_flight -= len(state.pending)
        self._room.set()
        metrics.IN_FLIGHT.labels(self.name).set(self._in_flight)

    # Rebalance callbacks run on the consumer thread, inside consume(); the event loop is free.

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self._on_loop(self._assign(keys))
        if self._paused:
            consumer.pause(partitions)
        log.info("assigned", extra={"loop": self.name, "partitions": _names(partitions)})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        offsets = self._on_loop(self._revoke(keys), self._drain_timeout_s + 5) or []
        if self._fatal is None:
            self._commit_sync(offsets)
        self._on_loop(self._release(keys))
        log.info("revoked", extra={"loop": self.name, "partitions": _names(partitions)})

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._on_loop(self._release([(tp.topic, tp.partition) for tp in partitions]))
        log.warning("partitions lost", extra={"loop": self.name, "partitions": _names(partitions)})

    def _on_loop(self, coro: Coroutine[Any, Any, T], timeout_s: float = 10.0) -> T | None:
        """Run a coroutine on the event loop from the consumer thread and wait for it."""
        assert self._loop is not None
        try:
            return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)
        except Exception:
            log.exception("rebalance step failed", extra={"loop": self.name})
            return None

    async def _assign(self, keys: list[tuple[str, int]]) -> None:
        for key in keys:
            self._partitions.setdefault(key, _PartitionState())

    async def _revoke(self, keys: list[tuple[str, int]]) -> list[TopicPartition]:
        await self._drain(keys)
        return self._offsets_to_commit(keys)

    async def _release(self, keys: list[tuple[str, int]]) -> None:
        self._drop(keys)


def _names(partitions: list[TopicPartition]) -> list[str]:
    return [f"{tp.topic}[{tp.partition}]" for tp in partitions]
