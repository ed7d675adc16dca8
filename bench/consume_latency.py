"""What one consume stage adds to latency at a modest rate, for two ways of calling consume.

`consumer.consume(500, 0.2)` returns when 500 records are there *or* the 0.2 s are up
(confluent-kafka-python issue #407: by design), so below ~2,500 records/s a record waits for
the rest of the 0.2 s in every stage. `services/runtime/consume.take`, which every loop and
view uses, takes what is already fetched without waiting, and waits only when there is
nothing: `consume(500, 0)`, then `poll(0.2)` if that was empty.

Both are measured on a one-partition topic of the bench's private broker: records produced
at `rate_per_s`, each stamped with its produce time; latency = time seen by the loop minus stamp.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from bench.analysis import percentile
from services.runtime.consume import take

TOPIC = "bench.consume-latency"
BATCH = 500
TIMEOUT_S = 0.2

Strategy = Callable[[Consumer], list[Message]]


def batch_wait(consumer: Consumer) -> list[Message]:
    return list(consumer.consume(BATCH, TIMEOUT_S))


def drain_then_wait(consumer: Consumer) -> list[Message]:
    return take(consumer, BATCH, TIMEOUT_S)


def _measure(bootstrap: str, strategy: Strategy, rate_per_s: float, seconds: float) -> list[float]:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "bench-consume-latency", "log_level": 0}
    )
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "log_level": 0})
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(TOPIC, 0), timeout=10)
        consumer.assign([TopicPartition(TOPIC, 0, high)])
        consumer.consume(1, 1.0)  # connect and fetch once before the clock starts
        count = int(rate_per_s * seconds)
        done = threading.Event()

        def produce() -> None:
            start = time.monotonic()
            for index in range(count):
                delay = start + index / rate_per_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                producer.produce(TOPIC, repr(time.time()).encode())
                producer.poll(0)
            producer.flush(10)
            done.set()

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        latencies: list[float] = []
        deadline = time.monotonic() + seconds + 10
        while len(latencies) < count and time.monotonic() < deadline:
            for message in strategy(consumer):
                if message.error() is None and (value := message.value()) is not None:
                    latencies.append(1000 * (time.time() - float(value)))
        thread.join(timeout=10)
        return latencies
    finally:
        consumer.close()


def measure(bootstrap: str, rate_per_s: float = 100.0, seconds: float = 5.0) -> dict[str, Any]:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    if TOPIC not in admin.list_topics(timeout=10).topics:
        admin.create_topics([NewTopic(TOPIC, num_partitions=1, replication_factor=1)])[
            TOPIC
        ].result(30)
    results: dict[str, Any] = {"rate_per_s": rate_per_s, "seconds": seconds}
    for name, strategy in (
        ("consume(500, 0.2)", batch_wait),
        ("take(500, 0.2) [services/runtime/consume.py]", drain_then_wait),
    ):
        latencies = _measure(bootstrap, strategy, rate_per_s, seconds)
        results[name] = {
            "records": len(latencies),
            "p50_ms": round(percentile(latencies, 0.5), 1),
            "p99_ms": round(percentile(latencies, 0.99), 1),
        }
    return results
