"""The blocklist watch writes its pause to `mail.control` on the real broker, and clears it."""

from __future__ import annotations

import asyncio
import uuid

from confluent_kafka.admin import AdminClient

from schemas.catalogue import CONTROL
from schemas.records import ControlAction, ControlCommand
from services.runtime.producer import AsyncProducer
from services.sender.blocklist import BlocklistWatch, WatchConfig, query_name, resolver_for
from tests.integration.conftest import topic
from tests.support.dns_server import DnsServerFactory
from tests.support.kafka import BOOTSTRAP, TopicTail

ADDRESS = "192.0.2.44"
ZONE = "dnsbl.test"


async def test_listing_and_delisting_land_on_mail_control(
    kafka: AdminClient, dns_server_factory: DnsServerFactory
) -> None:
    pool = f"itest-{uuid.uuid4().hex[:8]}"  # a pool no running sender serves
    scope = f"pool:{pool}@dnsbl:{ZONE}"
    dns = dns_server_factory({query_name(ADDRESS, ZONE): {"A": ["127.0.0.2"]}})
    control = topic(CONTROL)  # this session's mail.control
    tail = TopicTail(control)
    producer = AsyncProducer({"bootstrap.servers": BOOTSTRAP, "enable.idempotence": True})

    async def publish(key: str, value: bytes | None) -> None:
        await producer.send(control, value, key)

    config = WatchConfig(pool=pool, addresses=[ADDRESS], zones=[ZONE], pause=True)
    watch = BlocklistWatch(config, publish, resolver_for((dns.host, dns.port)))
    try:
        await watch.check()
        dns.set(query_name(ADDRESS, ZONE), None)
        await watch.check()

        def mine() -> list[bytes | None]:
            return [m.value() for m in tail.records() if m.key() == scope.encode()]

        await asyncio.to_thread(tail.wait_for, lambda _: len(mine()) >= 2, 30.0)
    finally:
        producer.close()
        tail.stop()
    pause, tombstone = mine()
    command = ControlCommand.model_validate_json(pause or b"")
    assert command.scope == scope and command.action is ControlAction.PAUSE
    assert command.expires_at is not None
    assert tombstone is None
