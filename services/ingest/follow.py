"""Follow every partition of one topic in a background thread and feed a local view.

`Follower` reads from a start point (the beginning, or a point in time), calls
`on_record(partition, offset, key, value, timestamp_ms)` on its thread for every record,
is `ready` once it has read up to the end offsets it saw at start, and lets asyncio code wait
until a given record has been applied (`wait_applied`): that is how a replica reads its own
writes through the view.

Records are consumed in batches while there is a backlog, and one at a time with a blocking
poll when caught up, so a new record is applied within milliseconds (`consume(n, timeout)`
would wait out its whole timeout unless n records arrive).
"""

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

log = logging.getLogger(__name__)

BATCH = 1000
POLL_TIMEOUT_S = 0.1
METADATA_TIMEOUT_S = 10.0
OnRecord = Callable[[int, int, bytes | None, bytes | None, int], None]


class Follower:
    def __init__(
        self,
        kafka_config: dict[str, Any],
        topic: str,
        on_record: OnRecord,
        since_ms: int | None = None,
    ) -> None:
        """`since_ms`: start at the first record at or after this time (default: beginning)."""
        self._config = kafka_config | {
            "group.id": f"mailrail-ingest-view-{topic}-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,
        }
        self._topic = topic
        self._on_record = on_record
        self._since_ms = since_ms
        self._caught_up = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        #: partition → offset of the next record to apply
        self._applied: dict[int, int] = {}
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._thread = threading.Thread(target=self._run, name=f"follow-{topic}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def ready(self) -> bool:
        return self._caught_up.is_set()

    def wait_ready(self, timeout_s: float) -> bool:
        return self._caught_up.wait(timeout_s)

    async def wait_applied(self, partition: int, offset: int, timeout_s: float) -> None:
        """Return once the record at `offset` of `partition` has been applied (or TimeoutError)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._applied.get(partition, -1) > offset:
                return
            self._waiters.append((partition, offset, future))
        try:
            await asyncio.wait_for(future, timeout_s)
        finally:
            with self._lock:
                self._waiters = [w for w in self._waiters if w[2] is not future]

    def _start_offsets(self, consumer: Consumer, partitions: list[int]) -> dict[int, int]:
        """partition → (first offset to read, end offset now)."""
        found: dict[int, int] = {}
        if self._since_ms is not None:
            wanted = [TopicPartition(self._topic, p, self._since_ms) for p in partitions]
            for tp in consumer.offsets_for_times(wanted, timeout=METADATA_TIMEOUT_S):
                found[tp.partition] = tp.offset
        return found

    def _run(self) -> None:
        consumer = Consumer(self._config)
        try:
            metadata = consumer.list_topics(self._topic, timeout=METADATA_TIMEOUT_S)
            partitions = sorted(metadata.topics[self._topic].partitions)
            by_time = self._start_offsets(consumer, partitions)
            targets: dict[int, int] = {}
            assignment = []
            for partition in partitions:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(self._topic, partition), timeout=METADATA_TIMEOUT_S
                )
                # No record that recent: offsets_for_times answers -1, start at the end.
                found = by_time.get(partition, low)
                begin = high if found < 0 else max(low, found)
                if high > begin:
                    targets[partition] = high
                self._applied[partition] = begin
                assignment.append(TopicPartition(self._topic, partition, begin))
            consumer.assign(assignment)
            started = time.monotonic()
            if not targets:
                self._caught_up.set()
            while not self._stop.is_set():
                messages = consumer.consume(BATCH, 0)
                if not messages:
                    one = consumer.poll(POLL_TIMEOUT_S)
                    messages = [] if one is None else [one]
                self._apply(messages, targets)
                if not targets and not self._caught_up.is_set():
                    self._caught_up.set()
                    log.info(
                        "view loaded", extra={"topic": self._topic, "s": time.monotonic() - started}
                    )
        except Exception:
            log.exception("view stopped", extra={"topic": self._topic})
        finally:
            consumer.close()

    def _apply(self, messages: list[Message], targets: dict[int, int]) -> None:
        moved: set[int] = set()
        for message in messages:
            partition = int(message.partition() or 0)
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    targets.pop(partition, None)
                else:
                    log.warning(
                        "view read error", extra={"topic": self._topic, "error": str(error)}
                    )
                continue
            offset = int(message.offset() or 0)
            _, timestamp_ms = message.timestamp()
            try:
                self._on_record(partition, offset, message.key(), message.value(), timestamp_ms)
            except Exception:
                log.exception("view could not apply a record", extra={"topic": self._topic})
            with self._lock:
                self._applied[partition] = offset + 1
            moved.add(partition)
            if offset + 1 >= targets.get(partition, 0):
                targets.pop(partition, None)
        if moved:
            self._wake(moved)

    def _wake(self, partitions: set[int]) -> None:
        with self._lock:
            due = [
                future
                for partition, offset, future in self._waiters
                if partition in partitions and self._applied.get(partition, -1) > offset
            ]
        for future in due:
            future.get_loop().call_soon_threadsafe(_resolve, future)


def _resolve(future: "asyncio.Future[None]") -> None:
    if not future.done():
        future.set_result(None)
