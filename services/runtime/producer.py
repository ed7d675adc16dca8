"""An asyncio face on confluent-kafka's Producer.

`send()` returns an awaitable that resolves when the broker has acknowledged the record
(`acks=all`) or fails with the delivery error. A background thread serves delivery callbacks.
Every record carries the current trace context in its headers (`tracing.with_trace_headers`).
"""

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from services.runtime.tracing import with_trace_headers

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05
DEFAULT_DELIVERY_TIMEOUT_MS = 300_000  # librdkafka's
Headers = Sequence[tuple[str, bytes]]


class DeliveryFailed(Exception):
    """The broker did not acknowledge a record (retryable unless `fatal`)."""

    def __init__(self, error: KafkaError, uncertain: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.fatal = error.fatal()
        #: The record may have been stored all the same (its outcome never arrived).
        self.uncertain = uncertain


Record = tuple[str, bytes | None, bytes | str | None, Headers | None]
#: How confluent-kafka's `produce()` types headers (a list, so invariant: a cast is needed).
ProduceHeaders = list[tuple[str, str | bytes | None]] | None


class RecordProducer(Protocol):
    """What services write through: `AsyncProducer`, or `TransactionalProducer` (ingest)."""

    #: The longest a send can take to settle (acknowledged, or failed).
    settle_s: float

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | str | None = None,
        headers: Headers | None = None,
    ) -> "asyncio.Future[Message]": ...

    async def send_all(self, records: Sequence[Record]) -> None: ...

    def flush(self, timeout_s: float) -> int: ...

    def close(self, timeout_s: float = 10.0) -> None: ...


def traced(record: Record) -> Record:
    """The record with the current trace context in its headers. Taken where the record is
    handed over, on the event loop: a producer's own thread has no current span."""
    topic, value, key, headers = record
    return topic, value, key, cast(Headers, with_trace_headers(headers))


def produce_waiting(
    producer: Producer,
    record: Record,
    on_delivery: Callable[[KafkaError | None, Message], None],
) -> None:
    """`produce()`; while librdkafka's local queue is full, serve delivery reports until
    there is room. Raises KafkaException for a record that cannot be queued at all (unknown
    topic, too large)."""
    topic, value, key, headers = record
    while True:
        try:
            producer.produce(
                topic,
                value=value,
                key=key,
                headers=cast(ProduceHeaders, headers),
                on_delivery=on_delivery,
            )
            return
        except BufferError:
            producer.poll(POLL_INTERVAL_S)


class AsyncProducer:
    def __init__(
        self, config: dict[str, Any], loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self._producer = Producer(config)
        self.settle_s = int(config.get("delivery.timeout.ms", DEFAULT_DELIVERY_TIMEOUT_MS)) / 1000
        self._loop = loop or asyncio.get_running_loop()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="producer-poll", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(POLL_INTERVAL_S)

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | str | None = None,
        headers: Headers | None = None,
    ) -> "asyncio.Future[Message]":
        """Queue one record; the future resolves on the broker's acknowledgement."""
        future: asyncio.Future[Message] = self._loop.create_future()

        def on_delivery(error: KafkaError | None, message: Message) -> None:
            self._loop.call_soon_threadsafe(_settle, future, error, message)

        try:
            produce_waiting(self._producer, traced((topic, value, key, headers)), on_delivery)
        except KafkaException as exc:
            future.set_exception(DeliveryFailed(exc.args[0]))
        return future

    async def send_all(self, records: Sequence[Record]) -> None:
        """Send records and wait until every one is acknowledged; raises the first failure.

        One future for the whole batch: delivery reports are counted on the poll thread and
        the event loop is woken once, not once per record.
        """
        if not records:
            return
        future: asyncio.Future[None] = self._loop.create_future()
        pending = [len(records)]
        failure: list[KafkaError] = []
        lock = threading.Lock()

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            with lock:
                if error is not None and not failure:
                    failure.append(error)
                pending[0] -= 1
                done = pending[0] == 0
            if done:
                self._loop.call_soon_threadsafe(_settle_batch, future, failure)

        for record in records:
            try:
                produce_waiting(self._producer, traced(record), on_delivery)
            except KafkaException as exc:
                on_delivery(exc.args[0], None)  # type: ignore[arg-type]
        await future

    def flush(self, timeout_s: float) -> int:
        return int(self._producer.flush(timeout_s))

    def close(self, timeout_s: float = 10.0) -> None:
        remaining = self.flush(timeout_s)
        if remaining:
            log.warning("producer closed with %d records unacknowledged", remaining)
        self._closed.set()
        self._thread.join(timeout=2)


def _settle(future: "asyncio.Future[Message]", error: KafkaError | None, message: Message) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(DeliveryFailed(error))
    else:
        future.set_result(message)


def _settle_batch(future: "asyncio.Future[None]", failure: list[KafkaError]) -> None:
    if future.done():
        return
    if failure:
        future.set_exception(DeliveryFailed(failure[0]))
    else:
        future.set_result(None)
