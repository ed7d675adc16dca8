"""A local view of the compacted `mail.suppression` topic, read from the beginning.

Every process that must not mail a suppressed address (ingest, router) keeps one. The view
is ready once it has read up to the end offsets it saw at start; it then follows new records.
Entries are kept as compact bytes (see `suppression_store.py`): at a million addresses the
view holds a tenth of what a dict of models would.
"""

import logging
import threading
import time
import uuid
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from pydantic import ValidationError

from schemas.catalogue import SUPPRESSION
from schemas.records import Suppression
from services.runtime.suppression_store import SuppressionStore

log = logging.getLogger(__name__)

POLL_TIMEOUT_S = 0.2
METADATA_TIMEOUT_S = 10.0


class SuppressionView:
    def __init__(self, kafka_config: dict[str, Any], topic: str = SUPPRESSION) -> None:
        self._config = kafka_config | {
            "group.id": f"mailrail-suppression-view-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
        }
        self._topic = topic
        self._store = SuppressionStore()
        self._lock = threading.Lock()
        self._caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="suppression-view", daemon=True)

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

    def __len__(self) -> int:
        return len(self._store)

    def is_suppressed(self, tenant: str, address: str) -> bool:
        with self._lock:
            return self._store.contains(tenant, address)

    def get(self, tenant: str, address: str) -> Suppression | None:
        with self._lock:
            return self._store.get(tenant, address)

    def apply(self, key: str, entry: Suppression | None) -> None:
        """Record an entry (or its removal) already acknowledged by Kafka."""
        with self._lock:
            self._store.apply(key, entry)

    def page(self, tenant: str, after: str | None, limit: int) -> list[Suppression]:
        """Entries of one tenant in address order, starting after the address `after`."""
        with self._lock:
            return self._store.page(tenant, after, limit)

    def _run(self) -> None:
        consumer = Consumer(self._config)
        try:
            metadata = consumer.list_topics(self._topic, timeout=METADATA_TIMEOUT_S)
            partitions = list(metadata.topics[self._topic].partitions)
            targets: dict[int, int] = {}
            for partition in partitions:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(self._topic, partition), timeout=METADATA_TIMEOUT_S
                )
                if high > low:
                    targets[partition] = high
            consumer.assign([TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in partitions])
            if not targets:
                self._caught_up.set()
            started = time.monotonic()
            while not self._stop.is_set():
                for message in consumer.consume(500, POLL_TIMEOUT_S):
                    error = message.error()
                    partition = int(message.partition() or 0)
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            targets.pop(partition, None)
                        else:
                            log.warning("suppression view error", extra={"error": str(error)})
                    else:
                        self._ingest(message.key(), message.value())
                        if int(message.offset() or 0) + 1 >= targets.get(partition, 0):
                            targets.pop(partition, None)
                if not targets and not self._caught_up.is_set():
                    self._caught_up.set()
                    log.info(
                        "suppression view loaded",
                        extra={"entries": len(self._store), "s": time.monotonic() - started},
                    )
        except Exception:
            log.exception("suppression view stopped")
        finally:
            consumer.close()

    def _ingest(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        text_key = key.decode("utf-8", "replace")
        if value is None:
            self.apply(text_key, None)
            return
        try:
            entry = Suppression.model_validate_json(value)
        except ValidationError:
            log.warning("unreadable suppression record", extra={"key": text_key})
            return
        self.apply(text_key, entry)
