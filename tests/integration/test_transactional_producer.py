"""Ingest's transactional producer against the real broker: what it answers as stored is
committed, what it answers as failed is invisible to `read_committed` readers, and a restart
with the same id aborts what its predecessor left open instead of stalling readers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from services.runtime.producer import DeliveryFailed
from services.runtime.transactional import TransactionalProducer
from tests.support.kafka import BOOTSTRAP, broker_available

pytestmark = pytest.mark.skipif(not broker_available(), reason="no Kafka broker")

CONFIG = {"bootstrap.servers": BOOTSTRAP, "enable.idempotence": True, "acks": "all"}
SMALL_LIMIT = 2000  # the test topic's max.message.bytes


def _create(limit: int | None = None) -> str:
    name = f"test-txn-{uuid.uuid4().hex[:8]}"
    config = {"max.message.bytes": str(limit)} if limit else {}
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    admin.create_topics([NewTopic(name, 2, 1, config=config)])[name].result(20)
    return name


@pytest.fixture
def topic() -> Iterator[str]:
    """A topic refusing records over SMALL_LIMIT bytes."""
    name = _create(SMALL_LIMIT)
    yield name
    AdminClient({"bootstrap.servers": BOOTSTRAP}).delete_topics([name])


@pytest.fixture
def other_topic() -> Iterator[str]:
    name = _create()
    yield name
    AdminClient({"bootstrap.servers": BOOTSTRAP}).delete_topics([name])


@dataclass
class Read:
    values: list[bytes]
    #: Whether the reader got to every partition's end (for `read_committed`, that needs
    #: every transaction there to be over: committed or aborted).
    reached_end: bool


def log_ends(partitions: list[TopicPartition]) -> dict[int, int]:
    """Each partition's high watermark: the end of its log, open transactions included (a
    `read_committed` consumer would answer its last stable offset instead)."""
    probe = Consumer(
        {
            "bootstrap.servers": BOOTSTRAP,
            "group.id": "test-txn-probe",
            "isolation.level": "read_uncommitted",
        }
    )
    try:
        return {p.partition: probe.get_watermark_offsets(p, timeout=10)[1] for p in partitions}
    finally:
        probe.close()


def read_all(
    topic: str, isolation: Literal["read_committed", "read_uncommitted"], timeout_s: float = 10
) -> Read:
    """Every record value a reader with `isolation` sees."""
    consumer = Consumer(
        {
            "bootstrap.servers": BOOTSTRAP,
            "group.id": f"test-txn-{uuid.uuid4().hex[:8]}",
            "isolation.level": isolation,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        partitions = [TopicPartition(topic, p, 0) for p in range(2)]
        consumer.assign(partitions)
        ends = log_ends(partitions)
        values: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                values.append(message.value() or b"")
            positions = consumer.position(partitions)
            if all(ends[p.partition] == 0 or p.offset >= ends[p.partition] for p in positions):
                return Read(values, True)
        return Read(values, False)
    finally:
        consumer.close()


def test_sends_resolve_once_committed_and_readers_see_each_record_once(topic: str) -> None:
    async def run() -> tuple[int | None, int]:
        producer = TransactionalProducer(CONFIG, f"test-{uuid.uuid4().hex[:8]}", admission_s=5.0)
        try:
            one = await producer.send(topic, b"one", b"k1")
            await producer.send_all([(topic, b"two", b"k2", None), (topic, b"three", b"k3", None)])
            return one.offset(), producer.transactions
        finally:
            producer.close()

    offset, transactions = asyncio.run(run())
    assert offset is not None and offset >= 0  # where it was stored, as callers need
    assert transactions >= 1
    read = read_all(topic, "read_committed")
    assert read.reached_end
    assert sorted(read.values) == [b"one", b"three", b"two"]


def test_a_failed_transaction_is_aborted_whole_and_the_producer_goes_on(
    topic: str, other_topic: str
) -> None:
    async def run() -> BaseException | None:
        producer = TransactionalProducer(CONFIG, f"test-{uuid.uuid4().hex[:8]}", admission_s=5.0)
        try:
            failure: BaseException | None = None
            try:
                # One request's records: one its topic refuses (too large), one stored.
                await producer.send_all(
                    [
                        (topic, b"x" * (SMALL_LIMIT * 2), b"big", None),
                        (other_topic, b"small", b"k", None),
                    ]
                )
            except DeliveryFailed as exc:
                failure = exc
            await producer.send(other_topic, b"after", b"k")
            return failure
        finally:
            producer.close()

    failure = asyncio.run(run())
    assert isinstance(failure, DeliveryFailed)
    assert not failure.uncertain
    # "small" reached the log inside the aborted transaction; no committed reader sees it.
    assert b"small" in read_all(other_topic, "read_uncommitted").values
    assert read_all(other_topic, "read_committed") == Read([b"after"], True)
    assert read_all(topic, "read_committed") == Read([], True)


def test_a_restart_with_the_same_id_aborts_what_its_predecessor_left_open(topic: str) -> None:
    transactional_id = f"test-{uuid.uuid4().hex[:8]}"
    predecessor = Producer(
        CONFIG | {"transactional.id": transactional_id, "transaction.timeout.ms": 600_000}
    )
    predecessor.init_transactions(20)
    predecessor.begin_transaction()
    predecessor.produce(topic, b"left open", key=b"k", partition=0)
    assert predecessor.flush(10) == 0  # written, never committed: the process "died" here

    async def run() -> None:
        producer = TransactionalProducer(CONFIG, transactional_id, admission_s=10.0)
        try:
            await producer.send(topic, b"successor", b"k")
        finally:
            producer.close()

    asyncio.run(run())
    # Without the fencing, a read_committed reader would stop before "left open" until the
    # transaction timed out (10 minutes here): partition 0 would not be read to its end.
    assert read_all(topic, "read_committed") == Read([b"successor"], True)


def test_records_that_find_no_transaction_in_time_fail_and_are_never_written() -> None:
    async def run() -> tuple[BaseException | None, float]:
        producer = TransactionalProducer(
            CONFIG | {"bootstrap.servers": "127.0.0.1:1"},  # nobody listens there
            f"test-{uuid.uuid4().hex[:8]}",
            admission_s=1.0,
        )
        started = time.monotonic()
        try:
            await producer.send("unused", b"v", b"k")
        except DeliveryFailed as exc:
            return exc, time.monotonic() - started
        finally:
            producer.close(timeout_s=1.0)
        return None, time.monotonic() - started

    failure, _ = asyncio.run(run())
    assert isinstance(failure, DeliveryFailed)
    assert not failure.uncertain


def test_a_record_that_cannot_be_queued_fails_alone(other_topic: str) -> None:
    async def run() -> list[BaseException | None]:
        producer = TransactionalProducer(
            CONFIG | {"message.max.bytes": 10_000},  # librdkafka refuses larger records itself
            f"test-{uuid.uuid4().hex[:8]}",
            admission_s=5.0,
        )
        try:
            sends = [
                producer.send_all([(other_topic, b"first", b"a", None)]),
                producer.send_all([(other_topic, b"y" * 20_000, b"b", None)]),
                producer.send_all([(other_topic, b"third", b"c", None)]),
            ]
            return list(await asyncio.gather(*sends, return_exceptions=True))
        finally:
            producer.close()

    outcomes = asyncio.run(run())
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], DeliveryFailed) and not outcomes[1].uncertain
    read = read_all(other_topic, "read_committed")
    assert read.reached_end
    assert sorted(read.values) == [b"first", b"third"]
