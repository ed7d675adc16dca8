"""Follow a compacted topic from its beginning in a background thread.

`CompactedReader` calls `on_record(key, value)` for every record (value None = tombstone)
and is ready once it has read up to the end offsets it saw at start. Views of
`mail.control` (and of any other compacted topic) build on it.
"""

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

log = logging.getLogger(__name__)

POLL_TIMEOUT_S = 0.1
METADATA_TIMEOUT_S = 10.0
OnRecord = Callable[[str, bytes | None], None]


class CompactedReader:
    def __init__(self, kafka_config: dict[str, Any], topic: str, on_record: OnRecord) -> None:
        self._config = kafka_config | {
            "group.id": f"mailrail-view-{topic}-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
        }
        self._topic = topic
        self._on_record = on_record
        self._caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"view-{topic}", daemon=True)

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

    def _run(self) -> None:
        consumer = Consumer(self._config)
        try:
            partitions = list(
                consumer.list_topics(self._topic, timeout=METADATA_TIMEOUT_S)
                .topics[self._topic]
                .partitions
            )
            targets: dict[int, int] = {}
            for partition in partitions:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(self._topic, partition), timeout=METADATA_TIMEOUT_S
                )
                if high > low:
                    targets[partition] = high
            consumer.assign([TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in partitions])
            started = time.monotonic()
            while not self._stop.is_set():
                for message in consumer.consume(500, POLL_TIMEOUT_S):
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
                    key = message.key()
                    if key is not None:
                        self._on_record(key.decode("utf-8", "replace"), message.value())
                    if int(message.offset() or 0) + 1 >= targets.get(partition, 0):
                        targets.pop(partition, None)
                if not targets and not self._caught_up.is_set():
                    self._caught_up.set()
                    log.info(
                        "view loaded", extra={"topic": self._topic, "s": time.monotonic() - started}
                    )
        except Exception:
            log.exception("view stopped", extra={"topic": self._topic})
        finally:
            consumer.close()
