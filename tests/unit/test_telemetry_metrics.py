"""The metrics facade: what each kind of instrument exports, read back from the text /metrics
serves, and what recording costs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.runtime import lag, metrics, telemetry_metrics
from services.runtime.telemetry_metrics import counter, gauge, histogram
from services.sender import metrics as sender_metrics

ROOT = Path(__file__).resolve().parents[2]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(autouse=True)
def meter_provider() -> None:
    """What `run_service` installs at start (once per process: later calls change nothing)."""
    telemetry_metrics.configure("test")


def scrape() -> tuple[str, Samples]:
    body, content_type = telemetry_metrics.exposition()
    assert content_type.startswith("text/plain; version=")
    text = body.decode()
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return text, samples


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (n, labels), value in samples.items() if n == name}


def test_a_counter_counts_per_label_set_from_zero() -> None:
    requests = counter("test_tm_requests_total", "Requests seen", ["route", "status"])
    requests.labels("/a", "200").inc()
    requests.labels("/a", "200").inc(2)
    requests.labels(route="/b", status=500)
    plain = counter("test_tm_plain_total", "No labels")
    plain.inc()

    text, samples = scrape()
    assert series(samples, "test_tm_requests_total") == {
        frozenset({("route", "/a"), ("status", "200")}): 3.0,
        # Exported from its first labels() on, as prometheus_client did: increase() sees +1.
        frozenset({("route", "/b"), ("status", "500")}): 0.0,
    }
    assert series(samples, "test_tm_plain_total") == {frozenset(): 1.0}
    assert "# TYPE test_tm_requests_total counter" in text
    assert "# HELP test_tm_requests_total Requests seen" in text
    assert "test_tm_requests_created" not in text and "otel_scope" not in text


def test_a_gauge_is_exported_until_removed() -> None:
    lagging = gauge("test_tm_lag", "Unread records", ["topic", "partition"])
    lagging.labels("t", 0).set(7)
    lagging.labels("t", "1").set(2)
    lagging.labels(topic="t", partition="1").set(3)
    _, samples = scrape()
    assert series(samples, "test_tm_lag") == {
        frozenset({("topic", "t"), ("partition", "0")}): 7.0,
        frozenset({("topic", "t"), ("partition", "1")}): 3.0,
    }

    lagging.remove("t", "0")
    text, samples = scrape()
    assert series(samples, "test_tm_lag") == {frozenset({("topic", "t"), ("partition", "1")}): 3.0}
    assert "# TYPE test_tm_lag gauge" in text
    with pytest.raises(KeyError):
        lagging.remove("t", "0")

    lagging.labels("t", "0").set(1)
    lagging.clear()
    assert series(scrape()[1], "test_tm_lag") == {}


def test_a_histogram_has_the_given_buckets() -> None:
    waits = histogram(
        "test_tm_wait_seconds", "Time waited", ["pool"], buckets=(0, 0.01, 0.5, 1, 60)
    )
    for value in (0.0, 0.005, 0.3, 0.5, 2.0, 500.0):
        waits.labels("default").observe(value)

    text, samples = scrape()
    pool = ("pool", "default")
    buckets = {
        dict(labels)["le"]: value
        for labels, value in series(samples, "test_tm_wait_seconds_bucket").items()
        if pool in labels
    }
    # As prometheus_client wrote them: cumulative, `le` formatted the same, a value equal to
    # a bound counted in its bucket.
    assert buckets == {"0.0": 1, "0.01": 2, "0.5": 4, "1.0": 4, "60.0": 5, "+Inf": 6}
    assert series(samples, "test_tm_wait_seconds_count") == {frozenset({pool}): 6}
    assert series(samples, "test_tm_wait_seconds_sum") == {frozenset({pool}): 502.805}
    assert "# TYPE test_tm_wait_seconds histogram" in text
    # The unit (`s`) comes from the name and adds no second suffix.
    assert "test_tm_wait_seconds_seconds" not in text


def test_the_services_metrics_keep_their_prometheus_names() -> None:
    metrics.EVENTS.labels("delivered", "test-names").inc()
    sender_metrics.SMTP_SECONDS.labels("test-names", "other").observe(0.2)
    lag.LAG.labels("test-names", "mail.outbound.default", "3").set(5)

    text, samples = scrape()
    assert samples[
        ("mailrail_events_total", frozenset({("type", "delivered"), ("pool", "test-names")}))
    ] == (1.0)
    labels = frozenset({("pool", "test-names"), ("destination", "other")})
    assert samples[("mailrail_smtp_transaction_seconds_count", labels)] == 1.0
    assert samples[("mailrail_smtp_transaction_seconds_bucket", labels | {("le", "0.25")})] == 1
    lag_labels = {("loop", "test-names"), ("topic", "mail.outbound.default"), ("partition", "3")}
    assert samples[("mailrail_consumer_lag", frozenset(lag_labels))] == 5.0
    assert "# TYPE mailrail_events_total counter" in text
    assert "# TYPE mailrail_smtp_transaction_seconds histogram" in text
    # The resource, once, as OpenTelemetry's Prometheus exporter writes it (the service is
    # whichever test of this process configured first).
    [target] = series(samples, "target_info")
    assert dict(target)["service_name"].startswith("mailrail-")


def test_labels_are_checked() -> None:
    checked = counter("test_tm_checked_total", "Checked", ["a", "b"])
    with pytest.raises(ValueError, match="label values"):
        checked.labels("only-one")
    with pytest.raises(ValueError, match="labels"):
        checked.labels(a="x")
    with pytest.raises(ValueError, match="needs label values"):
        checked.inc()
    with pytest.raises(ValueError, match="defined twice"):
        counter("test_tm_checked_total", "Again")


def run_alone(script: str) -> str:
    """Run `script` in a fresh interpreter (its own global MeterProvider); its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_instruments_defined_before_the_provider_record_once_it_is_installed() -> None:
    text = run_alone(
        """
        from services.runtime import telemetry_metrics as tm
        early = tm.counter("early_total", "Defined at import", ["k"])
        waits = tm.histogram("early_seconds", "Defined at import", buckets=(1, 2))
        level = tm.gauge("early_level", "Set before the provider")
        early.labels("dropped").inc(5)  # no provider yet: dropped, exported from 0 later
        level.set(4)
        tm.configure("early")
        early.labels("kept").inc()
        waits.observe(1.5)
        print(tm.exposition()[0].decode())
        """
    )
    assert 'early_total{k="dropped"} 0.0' in text
    assert 'early_total{k="kept"} 1.0' in text
    assert 'early_seconds_bucket{le="2.0"} 1.0' in text
    assert "early_level 4.0" in text


def test_removed_gauge_series_do_not_count_against_the_cardinality_limit() -> None:
    """The SDK would remember every label set ever reported; removal makes it forget."""
    text = run_alone(
        """
        from services.runtime import telemetry_metrics as tm
        tm.GAUGE_SERIES_LIMIT = 5
        tm.configure("limit")
        destinations = tm.gauge("dest_rate", "Per destination", ["destination"])
        for i in range(50):
            destinations.labels(f"d{i}.example").set(i)
            tm.exposition()
            destinations.remove(f"d{i}.example")
        destinations.labels("new.example").set(1)
        print(tm.exposition()[0].decode())
        """
    )
    assert 'dest_rate{destination="new.example"} 1.0' in text
    assert "overflow" not in text and 'destination="d49.example"' not in text


def test_recording_cost_per_call() -> None:
    """What the sender pays per recorded value (printed with -s; no timed assertion)."""
    events = metrics.EVENTS
    smtp = sender_metrics.SMTP_SECONDS
    rate = sender_metrics.DESTINATION_RATE

    def count() -> None:
        events.labels("delivered", "cost").inc()

    def observe() -> None:
        smtp.labels("cost", "other").observe(0.01)

    def set_gauge() -> None:
        rate.labels("cost", "x").set(1.0)

    calls: dict[str, Callable[[], None]] = {
        "counter .labels(type, pool).inc()": count,
        "histogram .labels(pool, destination).observe()": observe,
        "gauge .labels(pool, destination).set()": set_gauge,
    }
    costs: dict[str, float] = {}
    for name, call in calls.items():
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(20_000):
                call()
            best = min(best, (time.perf_counter() - started) / 20_000)
        costs[name] = round(best * 1e6, 2)
    print(f"metrics recording, microseconds per call: {costs}")
    rate.remove("cost", "x")
