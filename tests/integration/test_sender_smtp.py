"""The sender against real SMTP and DNS servers on loopback: MX choice and failover, DNS
failures, SIZE and SMTPUTF8, broken connections, TLS policy. No Kafka: the deliverer's
output records are inspected directly."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from datetime import timedelta

import pytest

from schemas.api import Content
from schemas.records import BatchRecipient, DeliveryBatch, DeliveryEvent, utc_now
from schemas.rules import Pool, Rules, ShapingOverride
from services.runtime.codec import decode as _unused  # noqa: F401
from services.runtime.controls import Controls
from services.runtime.dns import MxResolver
from services.sender.deliver import Deliverer, DeliveryPolicy
from services.sender.smtp import SmtpOptions, SmtpPool
from tests.support.dns_server import NULL_MX, DnsServerFactory
from tests.support.smtp_server import SmtpServerFactory

KEY = b"test-verp-key-0123456789"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def batch(domain: str, *locals_: str, text: str = "hello", attempt: int = 1) -> DeliveryBatch:
    return DeliveryBatch(
        message_id="0123456789abcdef0123456789abcdef",
        tenant="acme",
        pool="default",
        throttle_key=domain,
        domain=domain,
        from_="Shop <shop@acme.example>",
        content=Content(subject="Hi", text=text),
        recipients=[
            BatchRecipient(email=f"{local}@{domain}", index=i)
            for i, local in enumerate(locals_ or ("user",))
        ],
        accepted_at=utc_now(),
        attempt=attempt,
    )


def deliverer(
    port: int, dns: str | None = None, rules: Rules | None = None, verp: bool = True
) -> Deliverer:
    resolver = None
    if dns is not None:
        host, _, dns_port = dns.rpartition(":")
        resolver = MxResolver((host, int(dns_port)), timeout_s=2.0)
    policy = DeliveryPolicy(
        bounce_domain="bounces.mailrail.example",
        verp_key=KEY,
        retry_schedule_s=[60],
        max_age=timedelta(days=3),
        smtp_port=port,
        smart_host=None if dns else ("127.0.0.1", port),
    )
    return Deliverer(
        Pool(name="default", ehlo="sender.mailrail.example", verp=verp),
        rules or Rules(),
        policy,
        SmtpPool(SmtpOptions(ehlo="sender.mailrail.example", connect_timeout_s=3)),
        resolver,
        Controls(),
    )


def events_of(outputs: list) -> list[DeliveryEvent]:  # type: ignore[type-arg]
    return [
        DeliveryEvent.model_validate_json(o.value)
        for o in outputs
        if o.topic.endswith("mail.events")
    ]


def retries_of(outputs: list) -> list[DeliveryBatch]:  # type: ignore[type-arg]
    return [DeliveryBatch.model_validate_json(o.value) for o in outputs if ".retry." in o.topic]


async def test_mx_by_preference_with_failover_to_the_next_host(
    smtp_server_factory: SmtpServerFactory, dns_server_factory: DnsServerFactory
) -> None:
    port = free_port()
    backup = smtp_server_factory(host="127.0.0.12", port=port)
    dns = dns_server_factory(
        {
            "fo.example": {"MX": [(20, "backup.fo.example"), (10, "primary.fo.example")]},
            "primary.fo.example": {"A": ["127.0.0.11"]},  # nothing listens there
            "backup.fo.example": {"A": ["127.0.0.12"]},
        }
    )
    outputs = await deliverer(port, dns.address).deliver(batch("fo.example", "ann"))
    [event] = events_of(outputs)
    assert event.type.value == "delivered" and event.mx == "backup.fo.example"
    assert [m.rcpt_tos for m in backup.messages] == [["ann@fo.example"]]


async def test_a_4xx_greeting_fails_over_too(
    smtp_server_factory: SmtpServerFactory, dns_server_factory: DnsServerFactory
) -> None:
    port = free_port()
    busy = smtp_server_factory(host="127.0.0.13", port=port, greeting="421 4.7.0 busy, try later")
    good = smtp_server_factory(host="127.0.0.14", port=port)
    dns = dns_server_factory(
        {
            "gr.example": {"MX": [(10, "a.gr.example"), (20, "b.gr.example")]},
            "a.gr.example": {"A": ["127.0.0.13"]},
            "b.gr.example": {"A": ["127.0.0.14"]},
        }
    )
    outputs = await deliverer(port, dns.address).deliver(batch("gr.example"))
    assert events_of(outputs)[0].type.value == "delivered"
    assert busy.stats.connections == 1 and not busy.messages and len(good.messages) == 1


async def test_no_mx_falls_back_to_the_domains_address(
    smtp_server_factory: SmtpServerFactory, dns_server_factory: DnsServerFactory
) -> None:
    port = free_port()
    server = smtp_server_factory(host="127.0.0.15", port=port)
    dns = dns_server_factory({"bare.example": {"A": ["127.0.0.15"]}})
    outputs = await deliverer(port, dns.address).deliver(batch("bare.example"))
    assert events_of(outputs)[0].type.value == "delivered" and len(server.messages) == 1


@pytest.mark.parametrize(
    ("records", "kind", "enhanced", "retried"),
    [
        ({"nx.example": "NXDOMAIN"}, "bounced", "5.1.2", False),
        ({"null.example": {"MX": NULL_MX}}, "bounced", "5.1.10", False),
        ({"sf.example": "SERVFAIL"}, "deferred", "4.4.3", True),
        ({"noaddr.example": {"MX": [(10, "ghost.noaddr.example")]}}, "deferred", "4.4.4", True),
    ],
)
async def test_dns_outcomes(
    dns_server_factory: DnsServerFactory,
    records: dict,  # type: ignore[type-arg]
    kind: str,
    enhanced: str,
    retried: bool,
) -> None:
    dns = dns_server_factory(records)
    domain = next(iter(records))
    outputs = await deliverer(free_port(), dns.address).deliver(batch(domain))
    [event] = events_of(outputs)
    assert event.type.value == kind and event.smtp is not None and event.smtp.enhanced == enhanced
    assert bool(retries_of(outputs)) is retried


async def test_mx_answers_are_cached_for_their_ttl(
    smtp_server_factory: SmtpServerFactory, dns_server_factory: DnsServerFactory
) -> None:
    port = free_port()
    smtp_server_factory(host="127.0.0.16", port=port)
    dns = dns_server_factory(
        {
            "c.example": {"MX": [(10, "mx.c.example")], "ttl": 300},
            "mx.c.example": {"A": ["127.0.0.16"], "ttl": 300},
        }
    )
    sender = deliverer(port, dns.address)
    for _ in range(3):
        await sender.deliver(batch("c.example"))
    assert dns.query_count("c.example", "MX") == 1


async def test_the_resolver_keeps_an_answer_for_its_ttl_and_asks_again_after(
    dns_server_factory: DnsServerFactory,
) -> None:
    dns = dns_server_factory(
        {
            "long.example": {"MX": [(10, "mx.long.example")], "ttl": 900},
            "mx.long.example": {"A": ["127.0.0.16"], "ttl": 600},
            "short.example": {"MX": [(10, "mx.short.example")], "ttl": 900},
            "mx.short.example": {"A": ["127.0.0.17"], "ttl": 5},
        }
    )
    now = [1000.0]
    host, port = dns.address.rsplit(":", 1)
    resolver = MxResolver((host, int(port)), timeout_s=2.0, clock=lambda: now[0])
    for domain in ("long.example", "short.example"):
        await resolver.resolve(domain)
    now[0] += 120  # past a 60 s cap, within both MX TTLs and the A record's 600 s
    await resolver.resolve("long.example")
    assert dns.query_count("long.example", "MX") == 1
    await resolver.resolve("short.example")  # its address lived 5 s: the route with it
    assert dns.query_count("short.example", "MX") == 2
    now[0] += 500  # 620 s in all: the lowest TTL of the route (its A record) ran out
    await resolver.resolve("long.example")
    assert dns.query_count("long.example", "MX") == 2


async def test_message_larger_than_the_servers_size_is_refused_before_data(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory(max_size_bytes=2000)
    outputs = await deliverer(server.port).deliver(batch("size.example", text="x" * 5000))
    [event] = events_of(outputs)
    assert event.type.value == "bounced" and event.smtp is not None
    assert (event.smtp.code, event.smtp.enhanced) == (552, "5.3.4")
    assert server.stats.data_commands == 0 and server.stats.transactions == 0


async def test_non_ascii_local_part_without_smtputf8_is_refused(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory(advertise_smtputf8=False)
    outputs = await deliverer(server.port).deliver(batch("utf8.example", "josé"))
    [event] = events_of(outputs)
    assert (
        event.smtp is not None and event.smtp.enhanced == "5.6.7" and event.type.value == "bounced"
    )
    assert server.stats.transactions == 0


async def test_connection_cut_mid_data_is_a_deferral(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory(disconnect_mid_data=True)
    outputs = await deliverer(server.port).deliver(batch("cut.example"))
    [event] = events_of(outputs)
    assert (
        event.type.value == "deferred" and event.smtp is not None and event.smtp.enhanced == "4.4.2"
    )
    assert [r.recipients[0].email for r in retries_of(outputs)] == ["user@cut.example"]
    assert not server.messages


async def test_no_reply_to_the_final_dot_is_flagged_as_a_possible_duplicate(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory(drop_after_data=True)
    outputs = await deliverer(server.port).deliver(batch("drop.example"))
    [event] = events_of(outputs)
    assert event.type.value == "deferred" and "possible duplicate" in (event.detail or "")
    assert len(server.unanswered) == 1


async def test_mixed_replies_each_recipient_in_its_state(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory(
        replies={
            "b@mix.example": "452 4.5.3 too many recipients",
            "c@mix.example": "451 4.3.0 try again",
            "d@mix.example": "550 5.1.1 no such user",
        }
    )
    outputs = await deliverer(server.port).deliver(batch("mix.example", "a", "b", "c", "d", "e"))
    states = {e.recipient.split("@")[0]: e.type.value for e in events_of(outputs)}
    assert states == {
        "a": "delivered",
        "b": "deferred",
        "c": "deferred",
        "d": "bounced",
        "e": "delivered",
    }
    [retry] = retries_of(outputs)
    assert sorted(r.email for r in retry.recipients) == ["b@mix.example", "c@mix.example"]
    assert retry.attempt == 2
    assert sorted(r for m in server.messages for r in m.rcpt_tos) == [
        "a@mix.example",
        "e@mix.example",
    ]


async def test_required_tls_never_sends_in_plaintext(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory(advertise_starttls=False)
    rules = Rules(domains={"tls.example": ShapingOverride(tls="required")})
    outputs = await deliverer(server.port, rules=rules).deliver(batch("tls.example"))
    [event] = events_of(outputs)
    assert event.type.value == "deferred" and not server.messages


async def test_opportunistic_tls_upgrades_when_offered(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory(advertise_starttls=True)
    outputs = await deliverer(server.port).deliver(batch("starttls.example"))
    assert events_of(outputs)[0].type.value == "delivered" and len(server.messages) == 1


async def test_connections_are_reused_and_pipelined(smtp_server_factory: SmtpServerFactory) -> None:
    server = smtp_server_factory()
    sender = deliverer(server.port)
    for _ in range(3):
        await sender.deliver(batch("reuse.example", "a", "b"))
    assert server.stats.messages == 6 and server.stats.connections == 1


async def test_without_verp_identical_bodies_share_one_transaction(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory(
        replies={
            "c@shared.example": "452 4.5.3 too many recipients",
            "d@shared.example": "451 4.3.0 try again",
            "e@shared.example": "550 5.1.1 no such user",
        }
    )
    outputs = await deliverer(server.port, verp=False).deliver(batch("shared.example", *"abcde"))
    states = {e.recipient.split("@")[0]: e.type.value for e in events_of(outputs)}
    assert states == {
        "a": "delivered",
        "b": "delivered",
        "c": "deferred",
        "d": "deferred",
        "e": "bounced",
    }
    [message] = server.messages
    assert message.rcpt_tos == ["a@shared.example", "b@shared.example"]
    assert message.header("To") == "undisclosed-recipients:;"
    assert server.stats.transactions == 1
    [retry] = retries_of(outputs)
    assert sorted(r.email for r in retry.recipients) == ["c@shared.example", "d@shared.example"]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_data_is_never_sent_when_every_rcpt_fails(
    smtp_server_factory: SmtpServerFactory, pipelining: bool
) -> None:
    server = smtp_server_factory(
        advertise_pipelining=pipelining,
        replies={"a@none.example": "550 5.1.1 no", "b@none.example": "451 4.3.0 later"},
    )
    outputs = await deliverer(server.port, verp=False).deliver(batch("none.example", "a", "b"))
    assert {e.recipient: e.type.value for e in events_of(outputs)} == {
        "a@none.example": "bounced",
        "b@none.example": "deferred",
    }
    assert not server.messages
    if not pipelining:
        assert server.stats.data_commands == 0


async def test_slow_destinations_never_take_the_whole_in_progress_budget(
    smtp_server_factory: SmtpServerFactory, dns_server_factory: DnsServerFactory
) -> None:
    port = free_port()
    smtp_server_factory(host="127.0.0.18", port=port, command_delays_s={".": 3.0})
    fast = smtp_server_factory(host="127.0.0.19", port=port)
    dns = dns_server_factory(
        {
            "slow-a.example": {"MX": [(10, "mx.slow.example")]},
            "slow-b.example": {"MX": [(10, "mx.slow.example")]},
            "mx.slow.example": {"A": ["127.0.0.18"]},
            "quick.example": {"MX": [(10, "mx.quick.example")]},
            "mx.quick.example": {"A": ["127.0.0.19"]},
        }
    )
    sender = deliverer(port, dns.address)
    sender._policy = dataclasses.replace(
        sender._policy, max_batches_per_destination=10, max_batches_in_progress=3
    )
    first = [
        asyncio.create_task(sender.deliver(batch("slow-a.example", f"a{i}"))) for i in range(3)
    ]
    await asyncio.sleep(1.5)  # three in progress, the oldest for over a second: slow-a is slow
    later = [
        asyncio.create_task(sender.deliver(batch("slow-a.example", f"b{i}"))) for i in range(3)
    ]
    started = time.monotonic()
    quick = await sender.deliver(batch("quick.example", "q"))
    quick_s = time.monotonic() - started
    newcomer = await sender.deliver(batch("slow-b.example", "c"))
    results = await asyncio.gather(*first, *later)
    assert [e.type.value for e in events_of(quick)] == ["delivered"] and fast.messages
    assert quick_s < 1.0, "the quick destination waited for the slow ones"
    # Past the budget, slow-a's further batches go to a delay topic instead of waiting (and
    # filling the loop's in-flight budget); quick.example and slow-b, with nothing in
    # progress, go at once.
    held = [r for outputs in results[3:] for r in retries_of(outputs)]
    assert len(held) == 3 and {r.held_for for r in held} == {"busy"}
    assert all(len(events_of(outputs)) == 1 for outputs in results[:3])
    assert [e.type.value for e in events_of(newcomer)] == ["delivered"]


async def test_fast_destinations_are_never_held_for_the_shared_budget(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory(command_delays_s={".": 0.05})
    sender = deliverer(server.port)
    sender._policy = dataclasses.replace(
        sender._policy, max_batches_per_destination=50, max_batches_in_progress=3
    )
    results = await asyncio.gather(
        *(sender.deliver(batch("busy-but-fast.example", f"u{i}")) for i in range(12))
    )
    assert not [r for outputs in results for r in retries_of(outputs)]
    assert server.stats.messages == 12


async def test_a_connection_carries_at_most_its_message_limit(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory()
    rules = Rules(domains={"limit.example": ShapingOverride(max_messages_per_connection=2)})
    outputs = await deliverer(server.port, rules=rules).deliver(batch("limit.example", *"abcde"))
    assert [e.type.value for e in events_of(outputs)] == ["delivered"] * 5
    assert server.stats.messages == 5 and server.stats.connections == 3


async def test_a_reused_connection_the_server_closed_costs_a_new_one_not_a_deferral(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    # Every connection carries one message; the server then drops it at the next MAIL.
    server = smtp_server_factory(hang_up_on_mail_after=1)
    outputs = await deliverer(server.port).deliver(batch("stale.example", *"abcde"))
    assert [e.type.value for e in events_of(outputs)] == ["delivered"] * 5
    assert not retries_of(outputs)
    assert server.stats.messages == 5 and server.stats.connections == 5


async def test_a_fresh_connection_closed_at_mail_is_a_deferral(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory(hang_up_on_mail_after=0)
    outputs = await deliverer(server.port).deliver(batch("closing.example"))
    assert [e.type.value for e in events_of(outputs)] == ["deferred"]
    assert len(retries_of(outputs)) == 1
    assert server.stats.messages == 0 and server.stats.connections == 1


async def test_a_destination_never_opens_more_than_its_connections(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory(command_delays_s={".": 0.3})
    rules = Rules(domains={"narrow.example": ShapingOverride(max_connections=2)})
    sender = deliverer(server.port, rules=rules)
    results = await asyncio.gather(
        *(sender.deliver(batch("narrow.example", f"u{i}")) for i in range(8))
    )
    assert sum(len(events_of(r)) for r in results) == 8 and server.stats.messages == 8
    assert server.stats.max_open_connections == 2


async def test_concurrent_lookups_of_a_domain_share_one_query_and_failures_serve_stale(
    dns_server_factory: DnsServerFactory,
) -> None:
    dns = dns_server_factory(
        {
            "burst.example": {"MX": [(10, "mx.burst.example")], "ttl": 5},
            "mx.burst.example": {"A": ["127.0.0.16"], "ttl": 5},
        }
    )
    now = [1000.0]
    host, port = dns.address.rsplit(":", 1)
    resolver = MxResolver((host, int(port)), timeout_s=2.0, clock=lambda: now[0])
    routes = await asyncio.gather(*(resolver.resolve("burst.example") for _ in range(50)))
    assert dns.query_count("burst.example", "MX") == 1
    assert all(r.hosts[0].addresses == ("127.0.0.16",) for r in routes)
    now[0] += 10  # expired; the resolver now fails for the domain
    dns.update({"burst.example": "SERVFAIL"})
    stale = await resolver.resolve("burst.example")
    assert stale.failure is None and stale.hosts[0].name == "mx.burst.example"
    assert dns.query_count("burst.example", "MX") == 2  # it did ask again
    fresh = MxResolver((host, int(port)), timeout_s=2.0)
    failed = await fresh.resolve("burst.example")  # no earlier answer to fall back on
    assert failed.failure is not None and failed.failure.code == 451
