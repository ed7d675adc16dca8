"""Follow every partition of one topic in a background thread and feed a local view.

`Follower` is the one reader behind every local view (suppressions, controls, stats,
idempotency keys, message status, the delivery ledger). It reads from a start point (the
beginning, a point in time, or the newest `tail_records`), calls
`on_record(partition, offset, key, value, timestamp_ms)` on its thread for every record, is
`ready` once it has read up to the end offsets it saw at start, and lets asyncio code wait
until a given record has been applied (`wait_applied`): that is how a replica reads its own
writes through the view.

Start-up retries until it succeeds or is stopped: right after a topic is created, or while a
broker moves leadership, metadata and watermark requests fail for a while (`Not leader for
partition`, unknown topic, timeouts); a view must wait that out, not die and leave its
service unready for good. A failure after start-up resumes from the next unapplied offset of
each partition, so no record is applied twice and none is skipped.

Records are consumed in batches while there is a backlog, and one at a time with a blocking
poll when caught up (`consume.take`), so a new record is applied within milliseconds.
"""

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from services.runtime.consume import take

log = logging.getLogger(__name__)

BATCH = 1000
POLL_TIMEOUT_S = 0.1
METADATA_TIMEOUT_S = 10.0
RETRY_FIRST_S = 0.2
RETRY_MAX_S = 5.0
#: Counted compressed and held decompressed: 8 MiB of ledger entries loading at start-up
#: was over 100 MiB resident in a sender.
VIEW_QUEUE_KBYTES = 1024
OnRecord = Callable[[int, int, bytes | None, bytes | None, int], None]
OnKeyed = Callable[[str, bytes | None], None]


class TopicNotReady(Exception):
    """The topic is missing, has no partitions yet, or answered with an error."""


def by_key(on_keyed: OnKeyed) -> OnRecord:
    """Adapt `on_keyed(key, value)` (value None = tombstone) for a compacted topic's view;
    records without a key mean nothing there and are skipped."""

    def on_record(
        _partition: int, _offset: int, key: bytes | None, value: bytes | None, _ts_ms: int
    ) -> None:
        if key is not None:
            on_keyed(key.decode("utf-8", "replace"), value)

    return on_record


class Follower:
    def __init__(
        self,
        kafka_config: dict[str, Any],
        topic: str,
        on_record: OnRecord,
        *,
        since_ms: int | None = None,
        tail_records: int | None = None,
        positions: dict[int, int] | None = None,
        on_batch: Callable[[], None] | None = None,
        on_stale: Callable[[str], None] | None = None,
    ) -> None:
        """Start at the beginning; or, with `since_ms`, at the first record at or after that
        time; or, with `tail_records`, at the newest that many records (split evenly over the
        partitions).

        A view that keeps its own state passes the `positions` it had read up to (partition →
        next offset): those partitions read on from there. If a partition ends before its
        position (the topic was recreated), `on_stale(reason)` is called and every partition
        starts over from the start point. `on_batch()` is called on the follower's thread
        after each batch of records is applied (and when a wait for records ran out), so a
        view can commit what it wrote."""
        self._config = kafka_config | {
            "group.id": f"mailrail-view-{topic}-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,
            # A view reads whole topics at start: bound what librdkafka prefetches for it
            # (its default is 64 MiB per consumer), so loading never costs more memory than
            # the view itself.
            "queued.max.messages.kbytes": VIEW_QUEUE_KBYTES,
            "fetch.max.bytes": VIEW_QUEUE_KBYTES * 1024,
            # A resumed position compacted or aged away: read on from the oldest record left.
            "auto.offset.reset": "earliest",
        }
        self._topic = topic
        self._on_record = on_record
        self._since_ms = since_ms
        self._tail_records = tail_records
        self._caught_up = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        #: partition → offset of the next record to apply
        self._applied: dict[int, int] = dict(positions or {})
        self._on_batch = on_batch
        self._on_stale = on_stale
        #: partition → end offset seen at start, until read up to it
        self._targets: dict[int, int] = {}
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._thread = threading.Thread(target=self._run, name=f"follow-{topic}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
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

    def _run(self) -> None:
        retry_s = RETRY_FIRST_S
        while not self._stop.is_set():
            try:
                self._follow()
                return
            except (KafkaException, TopicNotReady) as exc:
                log.warning(
                    "view waiting for its topic",
                    extra={"topic": self._topic, "error": str(exc), "retry_s": retry_s},
                )
            except Exception:
                log.exception("view failed: reading on", extra={"topic": self._topic})
            self._stop.wait(retry_s)
            retry_s = min(retry_s * 2, RETRY_MAX_S)

    def _follow(self) -> None:
        consumer = Consumer(self._config)
        try:
            consumer.assign(self._plan(consumer))
            started = time.monotonic()
            while not self._stop.is_set():
                self._apply(take(consumer, BATCH, POLL_TIMEOUT_S))
                if self._on_batch is not None:
                    self._on_batch()
                if not self._targets and not self._caught_up.is_set():
                    self._caught_up.set()
                    log.info(
                        "view loaded", extra={"topic": self._topic, "s": time.monotonic() - started}
                    )
        finally:
            consumer.close()

    def _plan(self, consumer: Consumer) -> list[TopicPartition]:
        """Where each partition starts: where it left off, else the start point asked for."""
        metadata = consumer.list_topics(self._topic, timeout=METADATA_TIMEOUT_S)
        topic = metadata.topics.get(self._topic)
        if topic is None or topic.error is not None or not topic.partitions:
            reason = "no partitions" if topic is None or topic.error is None else topic.error
            raise TopicNotReady(f"{self._topic}: {reason}")
        partitions = sorted(topic.partitions)
        watermarks = {
            p: consumer.get_watermark_offsets(
                TopicPartition(self._topic, p), timeout=METADATA_TIMEOUT_S
            )
            for p in partitions
        }
        behind = [p for p in partitions if self._applied.get(p, 0) > watermarks[p][1]]
        if behind:
            reason = f"{self._topic} partitions {behind} end before the positions read"
            log.warning("view starts over", extra={"topic": self._topic, "reason": reason})
            if self._on_stale is not None:
                self._on_stale(reason)
            with self._lock:
                self._applied.clear()
        fresh = [p for p in partitions if p not in self._applied]
        by_time: dict[int, int] = {}
        if self._since_ms is not None and fresh:
            wanted = [TopicPartition(self._topic, p, self._since_ms) for p in fresh]
            for tp in consumer.offsets_for_times(wanted, timeout=METADATA_TIMEOUT_S):
                by_time[tp.partition] = tp.offset
        tail = None
        if self._tail_records is not None:
            tail = max(1, self._tail_records // len(partitions))
        begins: dict[int, int] = {}
        targets: dict[int, int] = {}
        for partition in partitions:
            low, high = watermarks[partition]
            if partition in self._applied:
                begin = self._applied[partition]
            elif partition in by_time:
                # No record that recent: offsets_for_times answers -1, start at the end.
                found = by_time[partition]
                begin = high if found < 0 else max(low, found)
            elif tail is not None:
                begin = max(low, high - tail)
            else:
                begin = low
            begins[partition] = begin
            if high > begin:
                targets[partition] = high
        with self._lock:
            self._applied.update(begins)
        if not self._caught_up.is_set():
            self._targets = targets
        return [TopicPartition(self._topic, p, begins[p]) for p in partitions]

    def _apply(self, messages: list[Message]) -> None:
        moved: set[int] = set()
        for message in messages:
            partition = int(message.partition() or 0)
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    self._targets.pop(partition, None)
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
            if offset + 1 >= self._targets.get(partition, 0):
                self._targets.pop(partition, None)
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
