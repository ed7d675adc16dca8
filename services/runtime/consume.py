"""Take what a consumer has fetched, waiting only when it has nothing; and pin where a new
consumer group that starts "from now on" starts.

`consumer.consume(n, timeout)` returns when `n` records have arrived *or* the timeout ran
out, so at a modest rate every record would wait out most of the timeout at every hop of the
pipeline (`make bench`'s `consume_latency` measures it: about 100 ms per hop at 100 records/s
with a 0.2 s timeout). `take` returns at once what is there, and otherwise blocks only until
the first record arrives.
"""

import logging
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

log = logging.getLogger(__name__)


def take(consumer: Consumer, limit: int, timeout_s: float) -> list[Message]:
    """Up to `limit` records already fetched; if none, wait up to `timeout_s` for one."""
    messages = consumer.consume(limit, 0)
    if messages:
        return messages
    one = consumer.poll(timeout_s)
    return [] if one is None else [one]


def start_at_end(config: dict[str, Any], topic: str, timeout_s: float = 10.0) -> int:
    """Commit the current end of every partition of `topic` that the consumer group of
    `config` has no committed offset for; returns how many partitions that was.

    `auto.offset.reset=latest` is resolved only at a member's first fetch, so a record
    written between a new group's start-up and that fetch is skipped: committing the end
    first pins "from now on" to the moment this returns. A group that already has offsets
    keeps them; one whose members are running refuses the commit, which is harmless (it has
    started already)."""
    consumer = Consumer(config | {"enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if metadata is None or not metadata.partitions:
            return 0
        partitions = [TopicPartition(topic, p) for p in sorted(metadata.partitions)]
        committed = consumer.committed(partitions, timeout=timeout_s)
        missing = [tp for tp in committed if tp.offset < 0]
        for tp in missing:
            _, tp.offset = consumer.get_watermark_offsets(tp, timeout=timeout_s)
        if missing:
            try:
                consumer.commit(offsets=missing, asynchronous=False)
            except KafkaException as exc:
                log.info("group already running: its offsets stand", extra={"error": str(exc)})
                return 0
        return len(missing)
    finally:
        consumer.close()
