"""Consumer lag per topic and partition: the partition's high watermark minus the position.

Measured on the consumer's own thread from what librdkafka already knows (the high
watermark of the last fetch response, the position of the next record to hand out), so a
refresh costs no request to the broker and never slows the loop. A partition the loop has
paused is not fetched, so its high watermark (and lag) is as old as its last fetch; a
partition is reported from the first record read after it was assigned.
"""

import contextlib
from collections.abc import Sequence

from confluent_kafka import Consumer, KafkaException

from services.runtime.telemetry_metrics import gauge

INTERVAL_S = 5.0
LAG = gauge(
    "mailrail_consumer_lag",
    "Records in the partition not yet read by this consumer (high watermark - position)",
    ["loop", "topic", "partition"],
)


def lag_of(high: int, position: int) -> int | None:
    """Unread records; None while either offset is unknown (negative: a logical offset, as
    before the first fetch, or before the first record of the assignment was read)."""
    if high < 0 or position < 0:
        return None
    return max(0, high - position)


def measure(consumer: Consumer, loop: str) -> dict[tuple[str, int], int]:
    """Lag of every assigned partition, also set on the gauge. Consumer thread only."""
    try:
        positions = consumer.position(consumer.assignment())
    except KafkaException:
        return {}
    result: dict[tuple[str, int], int] = {}
    for tp in positions:
        try:
            _, high = consumer.get_watermark_offsets(tp, cached=True)
        except KafkaException:
            continue
        unread = lag_of(int(high), int(tp.offset))
        if unread is None:
            continue
        result[(tp.topic, tp.partition)] = unread
        LAG.labels(loop, tp.topic, str(tp.partition)).set(unread)
    return result


def forget(loop: str, keys: Sequence[tuple[str, int]]) -> None:
    """Drop the gauges of partitions this loop no longer owns."""
    for topic, partition in keys:
        with contextlib.suppress(KeyError):
            LAG.remove(loop, topic, str(partition))
