"""The shared consumer loop against the real broker: in-flight work is bounded (the loop waits
for room, and pauses the partitions when none comes), and offsets are committed only for
finished records."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from services.runtime.consume import start_at_end
from services.runtime.health import Health
from services.runtime.loop import PAUSE_AFTER_S, ConsumerLoop, Output
from services.runtime.producer import AsyncProducer
from services.runtime.settings import ServiceSettings
from tests.support.kafka import BOOTSTRAP, broker_available

pytestmark = pytest.mark.skipif(not broker_available(), reason="no Kafka broker")

RECORDS = 60
MAX_IN_FLIGHT = 5


class _Settings(ServiceSettings):
    def service_name(self) -> str:
        return "loop-test"


def _committed(topic: str, group: str) -> int:
    consumer = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": group})
    try:
        (tp,) = consumer.committed([TopicPartition(topic, 0)], timeout=10)
        return int(tp.offset)
    finally:
        consumer.close()


def _topic_with_records() -> tuple[str, str, AdminClient]:
    """A new one-partition topic holding RECORDS records "0".."59", and a group name."""
    topic = f"test-loop-{uuid.uuid4().hex[:8]}"
    group = f"test-loop-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(20)
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "enable.idempotence": True})
    for n in range(RECORDS):
        producer.produce(topic, str(n).encode())
    assert producer.flush(10) == 0
    return topic, group, admin


def _loop(
    name: str, topic: str, group: str, handler: Callable[[Message], Awaitable[Sequence[Output]]]
) -> ConsumerLoop:
    settings = _Settings(kafka_bootstrap=BOOTSTRAP)
    return ConsumerLoop(
        name=name,
        consumer_config=settings.consumer_config(group) | {"group.id": group},
        topics=[topic],
        handler=handler,
        producer=AsyncProducer(settings.producer_config()),
        health=Health(),
        max_in_flight=MAX_IN_FLIGHT,
        commit_interval_s=0.2,
    )


@pytest.mark.asyncio
async def test_in_flight_work_is_bounded_and_only_finished_records_are_committed() -> None:
    topic, group, admin = _topic_with_records()

    gate = asyncio.Event()
    running = 0
    peak = 0
    done: list[int] = []

    async def handler(message: Message) -> Sequence[Output]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await gate.wait()
        finally:
            running -= 1
        done.append(int(message.value() or b"-1"))
        return []

    loop = _loop("bounded", topic, group, handler)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        for _ in range(100):  # until the loop holds its limit of records
            if running >= MAX_IN_FLIGHT:
                break
            await asyncio.sleep(0.1)
        # Waiting for room, then (nothing finished) paused: it never takes more either way.
        await asyncio.sleep(PAUSE_AFTER_S + 1.5)
        assert running == MAX_IN_FLIGHT and peak == MAX_IN_FLIGHT
        assert loop.paused
        assert not done
        committed = await asyncio.to_thread(_committed, topic, group)
        # Nothing finished: no commit, or one that still points at the first record.
        assert committed <= 0, f"committed {committed} before any record finished"
        gate.set()
        for _ in range(200):
            if len(done) == RECORDS:
                break
            await asyncio.sleep(0.05)
        assert sorted(done) == list(range(RECORDS))
        assert peak == MAX_IN_FLIGHT
    finally:
        gate.set()
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
    try:
        assert await asyncio.to_thread(_committed, topic, group) == RECORDS
    finally:
        admin.delete_topics([topic])


@pytest.mark.asyncio
async def test_a_loop_at_its_limit_whose_records_finish_never_pauses() -> None:
    """A pause throws librdkafka's prefetch away; records finishing keep the loop from it."""
    topic, group, admin = _topic_with_records()
    done: list[int] = []
    running = peak = 0
    paused_seen = False
    loop: ConsumerLoop | None = None

    async def handler(message: Message) -> Sequence[Output]:
        nonlocal running, peak, paused_seen
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        paused_seen = paused_seen or bool(loop and loop.paused)
        done.append(int(message.value() or b"-1"))
        return []

    loop = _loop("steady", topic, group, handler)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        for _ in range(300):
            if len(done) == RECORDS:
                break
            await asyncio.sleep(0.05)
        assert sorted(done) == list(range(RECORDS))
        assert peak == MAX_IN_FLIGHT  # it was at its limit...
        assert not paused_seen  # ... and never paused
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        admin.delete_topics([topic])


def test_a_new_group_started_at_the_end_reads_what_came_after_not_before() -> None:
    topic = f"test-end-{uuid.uuid4().hex[:8]}"
    group = f"test-end-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(20)
    try:
        producer = Producer({"bootstrap.servers": BOOTSTRAP, "enable.idempotence": True})
        for n in range(4):
            producer.produce(topic, f"before-{n}".encode(), partition=n % 2)
        assert producer.flush(10) == 0
        config = {"bootstrap.servers": BOOTSTRAP, "group.id": group, "auto.offset.reset": "latest"}
        assert start_at_end(config, topic) == 2
        assert start_at_end(config, topic) == 0  # offsets now stand
        # Written after the start but before any member fetched: must not be skipped.
        producer.produce(topic, b"after", partition=1)
        assert producer.flush(10) == 0
        consumer = Consumer(config)
        consumer.subscribe([topic])
        seen: list[bytes] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not seen:
            seen += [m.value() or b"" for m in consumer.consume(10, 0.5) if m.error() is None]
        consumer.close()
        assert seen == [b"after"]
    finally:
        admin.delete_topics([topic])
