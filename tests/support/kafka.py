"""Test-side Kafka helpers: follow a topic from 'now' and wait for records to show up."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from schemas.records import DeliveryEvent

BOOTSTRAP = os.environ.get("MAILRAIL_KAFKA_BOOTSTRAP", "127.0.0.1:9092")


def broker_available(bootstrap: str = BOOTSTRAP, timeout_s: float = 5.0) -> bool:
    try:
        AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=timeout_s)
    except Exception:
        return False
    return True


class TopicTail:
    """Reads every record written to a topic (or to any of several) after construction, in a
    background thread."""

    def __init__(self, topic: str | Sequence[str], bootstrap: str = BOOTSTRAP) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"mailrail-test-tail-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
            }
        )
        assignment = []
        for name in [topic] if isinstance(topic, str) else topic:
            partitions = self._consumer.list_topics(name, timeout=10).topics[name].partitions
            for partition in partitions:
                high = self._end_offset(TopicPartition(name, partition))
                assignment.append(TopicPartition(name, partition, high))
        self._consumer.assign(assignment)
        self._records: list[Message] = []
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _end_offset(self, partition: TopicPartition) -> int:
        """The partition's end; a topic created a moment ago may need a few tries."""
        deadline = time.monotonic() + 20
        while True:
            try:
                _, high = self._consumer.get_watermark_offsets(partition, timeout=10)
                return int(high)
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = [m for m in self._consumer.consume(500, 0.1) if m.error() is None]
            if batch:
                with self._lock:
                    self._records.extend(batch)
                    self._lock.notify_all()
        self._consumer.close()

    def records(self) -> list[Message]:
        with self._lock:
            return list(self._records)

    def wait_for(
        self, predicate: Callable[[list[Message]], Any], timeout_s: float = 30.0
    ) -> list[Message]:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not predicate(self._records):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"condition not met within {timeout_s} s")
                self._lock.wait(remaining)
            return list(self._records)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class EventLog(TopicTail):
    """`mail.events` as parsed `DeliveryEvent`s."""

    def __init__(self, topic: str, bootstrap: str = BOOTSTRAP) -> None:
        super().__init__(topic, bootstrap)

    def events(
        self, recipient: str | None = None, message_id: str | None = None
    ) -> list[DeliveryEvent]:
        parsed = [DeliveryEvent.model_validate_json(m.value() or b"") for m in self.records()]
        return [
            e
            for e in parsed
            if (recipient is None or e.recipient == recipient)
            and (message_id is None or e.message_id == message_id)
        ]

    def wait_types(
        self, recipient: str, types: set[str], timeout_s: float = 30.0
    ) -> list[DeliveryEvent]:
        """Wait until the recipient has an event of every type in `types`; return its events."""

        def seen(_: list[Message]) -> bool:
            return types <= {e.type.value for e in self.events(recipient)}

        try:
            self.wait_for(seen, timeout_s)
        except TimeoutError:
            got = [(e.type.value, e.smtp) for e in self.events(recipient)]
            raise TimeoutError(f"{recipient}: wanted {types}, got {got}") from None
        return self.events(recipient)
