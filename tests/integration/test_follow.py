"""The reader behind every local view, against the real broker: it waits out a topic that is
not there yet (as right after creation), then reads every record in order and follows on."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from services.runtime.follow import Follower
from tests.support.kafka import BOOTSTRAP, broker_available

pytestmark = pytest.mark.skipif(not broker_available(), reason="no Kafka broker")


def _produce(topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "enable.idempotence": True})
    for value in values:
        producer.produce(topic, value, key=b"k")
    assert producer.flush(10) == 0


def test_a_view_waits_for_its_topic_then_reads_everything_in_order() -> None:
    topic = f"test-follow-{uuid.uuid4().hex[:8]}"
    seen: list[bytes] = []
    follower = Follower(
        {"bootstrap.servers": BOOTSTRAP},
        topic,
        lambda _p, _o, _k, value, _ts: seen.append(value or b""),
    )
    follower.start()
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    try:
        time.sleep(1.5)  # several failed start-ups: no topic yet
        assert not follower.ready
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(20)
        _produce(topic, [b"one", b"two", b"three"])
        assert follower.wait_ready(30), "the view never caught up once its topic existed"
        _produce(topic, [b"four"])
        deadline = time.monotonic() + 10
        while len(seen) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == [b"one", b"two", b"three", b"four"]
    finally:
        follower.stop()
        admin.delete_topics([topic])
