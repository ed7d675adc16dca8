"""The bounce SMTP listener on loopback, with a stand-in for Kafka: what a sending MTA sees."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, cast

import aiosmtplib
import pytest
from confluent_kafka import KafkaError

from schemas.catalogue import EVENTS, REJECTED
from services.bounce.classify import DEFAULT_CLASSIFIER
from services.bounce.match import Keys
from services.bounce.receiver import Policy, ReportHandler, serve_smtp
from services.bounce.verp import encode_return_path
from services.runtime.health import Health
from services.runtime.producer import AsyncProducer, DeliveryFailed, Headers

FIXTURES = Path(__file__).parent.parent / "fixtures" / "reports"
KEY = b"mailrail-fixture-verp-key-0000000"
DOMAIN = "bounce.mailrail.test"
POLICY = Policy(
    bounce_domain=DOMAIN,
    keys=Keys(KEY, b"unit-test-unsubscribe-key-0001"),
    classifier=DEFAULT_CLASSIFIER,
    report_local_parts=frozenset({"bounces", "fbl", "abuse", "postmaster"}),
    max_recipients=3,
)
Record = tuple[str, bytes | None, bytes | str | None, Headers | None]


class Kafka:
    """Stands in for the producer: holds each write until released, or fails it."""

    def __init__(self) -> None:
        self.written: list[Record] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail = False

    async def send_all(self, records: Sequence[Record]) -> None:
        await self.release.wait()
        if self.fail:
            raise DeliveryFailed(KafkaError(KafkaError._MSG_TIMED_OUT))
        self.written.extend(records)


@pytest.fixture
async def listener() -> AsyncIterator[tuple[int, Kafka]]:
    kafka = Kafka()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stop = asyncio.Event()
    health = Health()
    handler = ReportHandler(POLICY, cast(AsyncProducer, kafka), store_timeout_s=1.0)
    task = asyncio.create_task(
        serve_smtp(handler, f"127.0.0.1:{port}", stop, DOMAIN, 1024 * 1024, health)
    )
    for _ in range(100):
        if health.readiness().get("smtp"):
            break
        await asyncio.sleep(0.02)
    yield port, kafka
    stop.set()
    await task


async def send(port: int, data: bytes, rcpt: str) -> str:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as smtp:
        await smtp.mail("")
        await smtp.rcpt(rcpt)
        response = await smtp.data(data)
    return f"{response.code} {response.message}"


def verp(message_id: str = "01J9Z6Q3V4T8K2M5N7P9R1S3TA") -> str:
    return encode_return_path(message_id, 0, DOMAIN, "acme", KEY)


async def test_250_comes_only_after_kafka_has_the_events(listener: tuple[int, Kafka]) -> None:
    port, kafka = listener
    kafka.release.clear()
    data = (FIXTURES / "postfix-550-user-unknown.eml").read_bytes()
    answer = asyncio.create_task(send(port, data, verp()))
    await asyncio.sleep(0.3)
    assert not answer.done() and kafka.written == []
    kafka.release.set()
    assert (await answer).startswith("250 2.0.0 report rpt-")
    assert [(topic, key) for topic, _, key, _ in kafka.written] == [
        (EVENTS, "01J9Z6Q3V4T8K2M5N7P9R1S3TA")
    ]


async def test_451_when_kafka_does_not_take_it(listener: tuple[int, Kafka]) -> None:
    port, kafka = listener
    data = (FIXTURES / "postfix-550-user-unknown.eml").read_bytes()
    kafka.fail = True
    with pytest.raises(aiosmtplib.SMTPDataError) as failed:
        await send(port, data, verp())
    assert failed.value.code == 451
    kafka.fail = False
    kafka.release.clear()  # never acknowledged: the store timeout answers
    with pytest.raises(aiosmtplib.SMTPDataError) as slow:
        await send(port, data, verp())
    assert slow.value.code == 451 and kafka.written == []


async def test_an_unparsed_report_is_kept_with_its_envelope(listener: tuple[int, Kafka]) -> None:
    port, kafka = listener
    data = (FIXTURES / "unparsed-broken-mime.eml").read_bytes()
    answer = await send(port, data, f"abuse@{DOMAIN}")
    report_id = answer.split()[3]
    kept = [r for r in kafka.written if r[0] == REJECTED]
    assert len(kept) == 1
    _, value, key, headers = kept[0]
    assert key == report_id and value is not None
    assert value.replace(b"\r\n", b"\n") == data.replace(b"\r\n", b"\n")
    found = dict(headers or [])
    assert found["mailrail-smtp-rcpt-to"] == f"abuse@{DOMAIN}".encode()
    assert found["mailrail-smtp-peer"] == b"127.0.0.1"


async def test_rcpt_refusals(listener: tuple[int, Kafka]) -> None:
    port, _ = listener
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as smtp:
        await smtp.mail("")
        replies: list[Any] = []
        for rcpt in (
            "someone@example.com",
            f"someone@{DOMAIN}",
            verp().replace("-acme@", "-globex@"),
            f"b-notatoken@{DOMAIN}",
            verp(),
            f"POSTMASTER@{DOMAIN}",
            f"fbl@{DOMAIN}",
            f"bounces@{DOMAIN}",
        ):
            response = await smtp.execute_command(f"RCPT TO:<{rcpt}>".encode())
            replies.append((response.code, response.message.split()[0]))
    assert replies == [
        (550, "5.7.1"),
        (550, "5.1.1"),
        (550, "5.1.1"),
        (550, "5.1.1"),
        (250, "2.1.5"),
        (250, "2.1.5"),
        (250, "2.1.5"),
        (452, "4.5.3"),
    ]


async def test_it_greets_as_the_bounce_domain_and_stops_listening() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stop, health = asyncio.Event(), Health()
    handler = ReportHandler(POLICY, cast(AsyncProducer, Kafka()))
    task = asyncio.create_task(serve_smtp(handler, f"127.0.0.1:{port}", stop, DOMAIN, 1024, health))
    while not health.readiness().get("smtp"):
        await asyncio.sleep(0.02)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await reader.readline()).startswith(b"220 " + DOMAIN.encode())
    stop.set()
    await task
    assert await reader.read() == b"", "open connections are closed"
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
