"""What an operator's Prometheus scrapes at /metrics of each service, and that it moves."""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Stack, unique
from tests.integration.test_bounce_smtp import BOUNCE_DOMAIN, arf, deliver, sent_to
from tests.support.kafka import EventLog

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(stack: Stack, service: str) -> Samples:
    url = f"{stack.services[service].health_url}/metrics"
    if service == "ingest":
        url = f"{stack.url}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` carrying these labels (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def present(samples: Samples, name: str, **labels: str) -> bool:
    wanted = set(labels.items())
    return any(n == name and wanted <= ls for (n, ls) in samples)


def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.3)


def post(stack: Stack, recipients: list[str]) -> dict[str, object]:
    with stack.client() as client:
        answer = client.post(
            "/v1/messages",
            json={"from": "a@acme.example", "to": recipients, "subject": "m", "text": "t"},
        )
    assert answer.status_code == 202, answer.text
    result: dict[str, object] = answer.json()
    return result


@pytest.mark.asyncio
async def test_every_service_counts_what_happened(stack: Stack, events: EventLog) -> None:
    domain = f"metrics-{uuid.uuid4().hex[:8]}.example"
    before = {name: scrape(stack, name) for name in ("ingest", "router", "sender", "bounce")}
    good, bad, later = unique("ok", domain), unique("bounce", domain), unique("defer", domain)
    post(stack, [good, bad, later])
    events.wait_types(good, {"delivered"})
    events.wait_types(bad, {"bounced"})
    events.wait_types(later, {"deferred"})
    (original,) = sent_to(stack, good)
    assert (await deliver(stack, arf(original, good), f"fbl@{BOUNCE_DOMAIN}")).startswith("250")
    events.wait_types(good, {"complained"})

    def suppressed() -> bool:
        with stack.client() as client:
            return client.get(f"/v1/suppressions/{bad}").status_code == 200

    wait_until(suppressed)
    post(stack, [bad])
    events.wait_for(
        lambda _: any(e.type.value == "suppressed" for e in events.events(bad)), timeout_s=20
    )

    events.wait_types(later, {"expired"}, timeout_s=60)

    def moved(service: str, name: str, **labels: str) -> float:
        return value(scrape(stack, service), name, **labels) - value(
            before[service], name, **labels
        )

    assert moved("ingest", "mailrail_events_total", type="accepted") >= 4
    assert moved("router", "mailrail_events_total", type="queued") >= 3
    assert moved("router", "mailrail_events_total", type="suppressed") >= 1
    assert moved("sender", "mailrail_events_total", type="delivered") >= 1
    assert moved("sender", "mailrail_events_total", type="deferred") >= 1
    assert moved("sender", "mailrail_events_total", type="bounced") >= 1
    assert moved("sender", "mailrail_bounces_total", category="bad-mailbox") >= 1
    assert moved("sender", "mailrail_bounces_total", category="expired") >= 1
    assert moved("bounce", "mailrail_events_total", type="complained") >= 1
    assert (
        moved(
            "ingest",
            "mailrail_http_request_seconds_count",
            method="POST",
            route="/v1/messages",
            status="202",
        )
        >= 2
    )
    assert moved("sender", "mailrail_smtp_transaction_seconds_count", pool="default") >= 3
    assert moved("sender", "mailrail_quota_wait_seconds_count", pool="default") >= 3

    # Per destination: the sender refreshes these every MAILRAIL_STATS_INTERVAL_S (1 s here).
    per_destination = {"pool": "default", "destination": domain}
    gauges = (
        "mailrail_destination_rate_per_s",
        "mailrail_destination_quota_per_s",
        "mailrail_destination_backoff_factor",
        "mailrail_destination_connections_in_use",
        "mailrail_destination_connections_limit",
        "mailrail_destination_batches_waiting",
        "mailrail_destination_batches_held",
        "mailrail_destination_paused",
    )
    wait_until(lambda: all(present(scrape(stack, "sender"), g, **per_destination) for g in gauges))
    sender = scrape(stack, "sender")
    # The 451 "try again later" is a throttling reply: the destination backed off, and a
    # rate (unlimited before, -1) is now in force, with fewer connections allowed.
    assert value(sender, "mailrail_destination_backoff_factor", **per_destination) < 1.0
    assert value(sender, "mailrail_destination_quota_per_s", **per_destination) > 0
    assert 1 <= value(sender, "mailrail_destination_connections_limit", **per_destination) < 4
    assert present(sender, "mailrail_smtp_connections_open", pool="default")

    # Consumer lag, per topic and partition, in every consuming service.
    for service, loop in (("router", "accepted"), ("sender", "outbound"), ("bounce", "events")):

        def has_lag(service: str = service, loop: str = loop) -> bool:
            return present(scrape(stack, service), "mailrail_consumer_lag", loop=loop)

        wait_until(has_lag)
    lag = [
        ls
        for (n, ls) in scrape(stack, "sender")
        if n == "mailrail_consumer_lag" and ("loop", "outbound") in ls
    ]
    assert all({"topic", "partition"} <= {k for k, _ in ls} for ls in lag)
