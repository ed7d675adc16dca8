"""Blocklist watch against a loopback DNS server: verdicts, metric, pause records, delisting."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from schemas.api import Content
from schemas.records import BatchRecipient, ControlAction, ControlCommand, DeliveryBatch
from services.runtime import telemetry_metrics
from services.runtime.controls import Controls
from services.sender.blocklist import (
    BlocklistWatch,
    Listing,
    WatchConfig,
    query_name,
    resolver_for,
)
from tests.support.dns_server import DnsServerFactory, RunningDnsServer

LISTED_IP = "192.0.2.10"
CLEAN_IP = "192.0.2.11"
V6_IP = "2001:db8::1"
ZONE = "bl.test"


class FakeControlTopic:
    """The injected producer: keeps what was written to mail.control, key → value."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, bytes | None]] = []
        self.fail = False

    async def __call__(self, key: str, value: bytes | None) -> None:
        if self.fail:
            raise RuntimeError("broker unavailable")
        self.writes.append((key, value))

    def commands(self) -> list[ControlCommand]:
        return [ControlCommand.model_validate_json(v) for _, v in self.writes if v is not None]


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def listed(address: str, zone: str, code: str = "127.0.0.2") -> dict[str, object]:
    return {
        query_name(address, zone): {"A": [code], "TXT": [f"{address} listed, see https://{zone}/"]}
    }


@pytest.fixture(autouse=True)
def meter_provider() -> None:
    """What a sender installs at start (once per process: later calls change nothing)."""
    telemetry_metrics.configure("sender")


@pytest.fixture
def dns_server(dns_server_factory: DnsServerFactory) -> RunningDnsServer:
    return dns_server_factory(
        {
            **listed(LISTED_IP, ZONE),  # type: ignore[dict-item]
            **listed(LISTED_IP, "refused.test", "127.255.255.254"),  # type: ignore[dict-item]
            **listed(LISTED_IP, "wildcard.test", "192.0.2.99"),  # type: ignore[dict-item]
            query_name(LISTED_IP, "broken.test"): "SERVFAIL",
            **listed(V6_IP, ZONE, "127.0.0.4"),  # type: ignore[dict-item]
        }
    )


def watch(
    dns_server: RunningDnsServer,
    topic: FakeControlTopic,
    clock: Clock,
    zones: list[str] | None = None,
    addresses: list[str] | None = None,
    **config: object,
) -> BlocklistWatch:
    settings = WatchConfig(
        pool="bulk",
        addresses=addresses or [LISTED_IP, CLEAN_IP],
        zones=zones or [ZONE],
        **{"pause": True, "pause_s": 3600.0, **config},  # type: ignore[arg-type]
    )
    return BlocklistWatch(settings, topic, resolver_for((dns_server.host, dns_server.port)), clock)


def gauge(ip: str, zone: str = ZONE) -> float | None:
    labels = {"pool": "bulk", "ip": ip, "zone": zone}
    value: float | None = REGISTRY.get_sample_value("mailrail_blocklisted", labels)
    return value


def test_query_names() -> None:
    assert query_name("192.0.2.10", "zen.example") == "10.2.0.192.zen.example"
    assert query_name("2001:db8::1", "bl.example") == (
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.example"
    )


@pytest.mark.parametrize(
    ("address", "zone", "listing"),
    [
        (LISTED_IP, ZONE, Listing.LISTED),
        (CLEAN_IP, ZONE, Listing.CLEAR),
        (V6_IP, ZONE, Listing.LISTED),
        (LISTED_IP, "refused.test", Listing.UNKNOWN),
        (LISTED_IP, "wildcard.test", Listing.UNKNOWN),
        (LISTED_IP, "broken.test", Listing.UNKNOWN),
        (LISTED_IP, "bad..zone", Listing.UNKNOWN),
    ],
)
async def test_verdicts(
    address: str, zone: str, listing: Listing, dns_server: RunningDnsServer
) -> None:
    verdict = await watch(dns_server, FakeControlTopic(), Clock()).lookup(address, zone)
    assert verdict.listing is listing


async def test_listing_reason_comes_from_txt(dns_server: RunningDnsServer) -> None:
    verdict = await watch(dns_server, FakeControlTopic(), Clock()).lookup(LISTED_IP, ZONE)
    assert verdict.detail == f"127.0.0.2 ({LISTED_IP} listed, see https://{ZONE}/)"


async def test_listing_pauses_the_pool_until_delisted(
    dns_server: RunningDnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    topic, clock = FakeControlTopic(), Clock()
    watcher = watch(dns_server, topic, clock)
    with caplog.at_level(logging.WARNING, "services.sender.blocklist"):
        await watcher.check()
    assert gauge(LISTED_IP) == 1 and gauge(CLEAN_IP) == 0
    assert any(r.message == "pool address is blocklisted" for r in caplog.records)
    [command] = topic.commands()
    assert topic.writes[0][0] == command.scope == f"pool:bulk@dnsbl:{ZONE}"
    assert command.action is ControlAction.PAUSE
    assert command.expires_at == clock.now + timedelta(hours=1)
    assert command.reason is not None and f"{LISTED_IP} listed in {ZONE}" in command.reason

    clock.now += timedelta(minutes=5)
    await watcher.check()
    assert len(topic.writes) == 1, "a pause far from expiry is not written again"
    clock.now += timedelta(minutes=30)
    await watcher.check()
    assert len(topic.writes) == 2 and topic.commands()[1].expires_at == clock.now + timedelta(
        hours=1
    )

    dns_server.set(query_name(LISTED_IP, ZONE), None)
    await watcher.check()
    assert topic.writes[-1] == (f"pool:bulk@dnsbl:{ZONE}", None)
    assert gauge(LISTED_IP) == 0
    await watcher.check()
    assert len(topic.writes) == 3, "the tombstone is written once"


async def test_pause_scope_is_obeyed_by_the_senders_control_view(
    dns_server: RunningDnsServer,
) -> None:
    topic = FakeControlTopic()
    await watch(dns_server, topic, Clock()).check()
    controls = Controls()
    for key, value in topic.writes:
        controls.apply(key, ControlCommand.model_validate_json(value or b""))

    def batch(pool: str) -> DeliveryBatch:
        return DeliveryBatch(
            message_id="m1",
            tenant="acme",
            pool=pool,
            throttle_key="gmail.com",
            domain="gmail.com",
            from_="a@acme.example",
            content=Content(subject="s", text="t"),
            recipients=[BatchRecipient(email="x@gmail.com", index=0)],
            accepted_at=datetime.now(UTC),
        )

    now = datetime(2026, 11, 28, 12, 1, tzinfo=UTC)
    assert controls.paused_until(batch("bulk"), now) is not None
    assert controls.paused_until(batch("other"), now) is None


async def test_destinations_of_a_zone_get_one_pause_each(dns_server: RunningDnsServer) -> None:
    topic = FakeControlTopic()
    destinations = {ZONE: ["gmail", "yahoo.com"]}
    await watch(dns_server, topic, Clock(), destinations=destinations).check()
    assert sorted(key for key, _ in topic.writes) == [
        f"domain:gmail@pool:bulk@dnsbl:{ZONE}",
        f"domain:yahoo.com@pool:bulk@dnsbl:{ZONE}",
    ]


async def test_refused_or_failed_lookups_neither_list_nor_delist(
    dns_server: RunningDnsServer,
) -> None:
    topic = FakeControlTopic()
    watcher = watch(
        dns_server, topic, Clock(), zones=["refused.test", "broken.test"], addresses=[LISTED_IP]
    )
    await watcher.check()
    assert topic.writes == [] and watcher.state == {}
    assert gauge(LISTED_IP, "refused.test") is None

    listed_watcher = watch(dns_server, topic, Clock())
    await listed_watcher.check()
    dns_server.set(query_name(LISTED_IP, ZONE), "SERVFAIL")
    await listed_watcher.check()
    assert len(topic.writes) == 1 and topic.writes[0][1] is not None
    assert gauge(LISTED_IP) == 1


async def test_failed_write_is_retried_next_round(dns_server: RunningDnsServer) -> None:
    topic = FakeControlTopic()
    topic.fail = True
    watcher = watch(dns_server, topic, Clock())
    await watcher.check()
    assert watcher.paused == {}
    topic.fail = False
    await watcher.check()
    assert len(topic.commands()) == 1


async def test_without_pause_only_the_metric_changes(dns_server: RunningDnsServer) -> None:
    topic = FakeControlTopic()
    await watch(dns_server, topic, Clock(), pause=False).check()
    assert topic.writes == [] and gauge(LISTED_IP) == 1
