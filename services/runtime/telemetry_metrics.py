"""Metrics as OpenTelemetry instruments, served at `/metrics` in Prometheus' text format.

`counter`, `gauge` and `histogram` take the exported Prometheus name (the contract in
README.md), a help text and the label names, and return objects shaped like
prometheus_client's: `X.labels(*values).inc()`, `.set()`, `.observe()`, `X.remove(*values)`
(gauges), or `X.inc()` without labels. They can be defined at import time: their instruments
come from the global meter, a proxy until `configure` installs the process's MeterProvider;
what counters and histograms record before that is dropped, while gauges keep their values
here and report them from then on.

- A counter is an OTel `Counter` named without `_total`, which the exporter appends. A label
  set is exported (at 0) from its first `labels()` on, as prometheus_client did, so the first
  increment shows in `increase()`.
- A gauge is an `ObservableGauge` whose callback reports this module's dict of label set →
  value; `remove` deletes the entry, and the series is gone from the next scrape on. The SDK
  would keep a record (about 1 KB) of every label set a gauge ever reported, for the life of
  the process, and count it against the cardinality limit; `remove` drops it (`_release`).
- A histogram is an OTel `Histogram` with the given bucket boundaries as
  `explicit_bucket_boundaries_advisory`; `le` labels read as before (`0.5`, `1.0`, `+Inf`).
- A name ending in `_seconds` gets unit `s`: the exporter appends a unit's suffix only when
  the name lacks it, so the exported name is unchanged.

`configure(service)` (once per process, from `run_service`) installs a MeterProvider with the
traces' resource and a `PrometheusMetricReader`, which registers itself with
prometheus_client's default registry: each scrape (`exposition`) runs the gauges' callbacks
and turns the SDK's cumulative state into families. The reader adds no `otel_scope_*` labels
(turned off) and one `target_info` series that carries the resource (`service_name`, ...).
Counters and histograms no longer export `_created` series. `OTEL_SDK_DISABLED=true` turns
the metrics off too (the SDK's own rule), leaving only prometheus_client's process metrics.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Generic, TypeVar

from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider, ObservableGauge
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from services.runtime import tracing

log = logging.getLogger(__name__)

_METER_NAME = "mailrail"
#: Name suffix → OTel unit (the exporter maps `s` back to `seconds`).
_UNITS = {"_seconds": "s"}
#: Label sets one gauge may export at a time before new ones fold into a single
#: `otel_metric_overflow="true"` series (the SDK's default, 2000, is also the counters' and
#: histograms'). A safety bound: a sender has a gauge series per destination it knows.
GAUGE_SERIES_LIMIT = 50_000

_meter = metrics.get_meter(_METER_NAME)
_names: set[str] = set()
_counters: list[Counter] = []
_provider: MeterProvider | None = None
_lock = threading.Lock()

Attributes = dict[str, str]
C = TypeVar("C")


def _unit(name: str) -> str:
    return next((unit for suffix, unit in _UNITS.items() if name.endswith(suffix)), "")


class _Metric(Generic[C]):
    """Label handling shared by the three kinds; `_child` makes the per-label-set object."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        with _lock:
            if name in _names:
                raise ValueError(f"metric {name!r} is defined twice")
            _names.add(name)
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labels)
        self._children: dict[tuple[object, ...], C] = {}

    def labels(self, *values: object, **named: object) -> C:
        """The child of one label set, by position or by name (not both)."""
        child = None if named else self._children.get(values)
        if child is None:
            key = self._key(values, named)
            child = self._children.get(key)
            if child is None:
                child = self._child(key, dict(zip(self.labelnames, key, strict=True)))
                self._children[key] = child
            if not named:
                self._children[values] = child
        return child

    def _key(self, values: tuple[object, ...], named: dict[str, object]) -> tuple[str, ...]:
        if named:
            if values or set(named) != set(self.labelnames):
                raise ValueError(f"{self.name}: labels {sorted(named)} != {self.labelnames}")
            values = tuple(named[n] for n in self.labelnames)
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(values)} label values for {self.labelnames}")
        return tuple(str(v) for v in values)

    def _unlabelled(self) -> C:
        if self.labelnames:
            raise ValueError(f"{self.name} needs label values for {self.labelnames}")
        return self.labels()

    def _child(self, key: tuple[str, ...], attributes: Attributes) -> C:
        raise NotImplementedError


class CounterChild:
    __slots__ = ("_add", "_attributes")

    def __init__(self, instrument: metrics.Counter, attributes: Attributes) -> None:
        self._add = instrument.add
        self._attributes = attributes
        self.inc(0)

    def inc(self, amount: float = 1) -> None:
        self._add(amount, self._attributes)


class Counter(_Metric[CounterChild]):
    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labels)
        self._instrument = _meter.create_counter(
            name.removesuffix("_total"), unit=_unit(name), description=documentation
        )
        with _lock:
            _counters.append(self)

    def _child(self, key: tuple[str, ...], attributes: Attributes) -> CounterChild:
        return CounterChild(self._instrument, attributes)

    def inc(self, amount: float = 1) -> None:
        self._unlabelled().inc(amount)

    def _export_zeros(self) -> None:
        for child in list(self._children.values()):
            child.inc(0)


class HistogramChild:
    __slots__ = ("_attributes", "_record")

    def __init__(self, instrument: metrics.Histogram, attributes: Attributes) -> None:
        self._record = instrument.record
        self._attributes = attributes

    def observe(self, value: float) -> None:
        self._record(value, self._attributes)


class Histogram(_Metric[HistogramChild]):
    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> None:
        super().__init__(name, documentation, labels)
        self.buckets = tuple(float(b) for b in buckets)
        if list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"{name}: buckets must increase: {buckets}")
        self._instrument = _meter.create_histogram(
            name,
            unit=_unit(name),
            description=documentation,
            explicit_bucket_boundaries_advisory=self.buckets,
        )

    def _child(self, key: tuple[str, ...], attributes: Attributes) -> HistogramChild:
        return HistogramChild(self._instrument, attributes)

    def observe(self, value: float) -> None:
        self._unlabelled().observe(value)


class GaugeChild:
    __slots__ = ("_attributes", "_gauge", "_key")

    def __init__(self, gauge: Gauge, key: tuple[str, ...], attributes: Attributes) -> None:
        self._gauge = gauge
        self._key = key
        self._attributes = attributes

    def set(self, value: float) -> None:
        self._gauge._set(self._key, self._attributes, float(value))


class Gauge(_Metric[GaugeChild]):
    """Values kept here, per label set; the ObservableGauge's callback reports them."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labels)
        self._values: dict[tuple[str, ...], tuple[float, Attributes]] = {}
        self._values_lock = threading.Lock()
        self._instrument = _meter.create_observable_gauge(
            name, callbacks=[self._observe], unit=_unit(name), description=documentation
        )

    def labels(self, *values: object, **named: object) -> GaugeChild:
        # Not cached: label sets come and go (`remove`), and a gauge is set seldom.
        key = self._key(values, named)
        return GaugeChild(self, key, dict(zip(self.labelnames, key, strict=True)))

    def set(self, value: float) -> None:
        self._unlabelled().set(value)

    def remove(self, *values: object) -> None:
        """Stop exporting this label set; KeyError if it has no value."""
        key = self._key(values, {})
        with self._values_lock:
            _, attributes = self._values.pop(key)
        _release(self._instrument, attributes)

    def clear(self) -> None:
        with self._values_lock:
            entries = list(self._values.values())
            self._values.clear()
        for _, attributes in entries:
            _release(self._instrument, attributes)

    def _set(self, key: tuple[str, ...], attributes: Attributes, value: float) -> None:
        with self._values_lock:
            self._values[key] = (value, attributes)

    def _observe(self, _: CallbackOptions) -> Iterable[Observation]:
        with self._values_lock:
            return [Observation(value, attributes) for value, attributes in self._values.values()]


def _release(instrument: object, attributes: Attributes) -> None:
    """Make the SDK forget one label set of an asynchronous instrument.

    opentelemetry-sdk keeps the cumulative state of every label set an asynchronous
    instrument ever reported, for the life of the process, and counts them against the
    cardinality limit: per-destination gauges would hold about 1 KB for every destination
    ever mailed and, past the limit, fold new destinations into `otel_metric_overflow`.
    There is no public way to forget one, so this reaches into the SDK's storage (1.45);
    should that change, it does nothing (tests/unit/test_telemetry_metrics.py would notice).
    A label set removed on another thread during a scrape, between the callback and the
    aggregation, may come back as such a record (not exported): rare, one record.
    """
    try:
        from opentelemetry.sdk.metrics._internal._view_instrument_match import (
            _hash_attributes,
        )
    except ImportError:
        return
    real = getattr(instrument, "_real_instrument", None) or instrument
    consumer = getattr(real, "_measurement_consumer", None)
    storages: dict[object, Any] = getattr(consumer, "_reader_storages", None) or {}
    key = _hash_attributes(attributes)
    for storage in storages.values():
        matches = getattr(storage, "_instrument_view_instrument_matches", None) or {}
        for match in matches.get(real, ()):
            aggregations = getattr(match, "_attributes_aggregation", None)
            lock = getattr(match, "_lock", None)
            if isinstance(aggregations, dict) and lock is not None:
                with lock:
                    aggregations.pop(key, None)


def counter(name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
    return Counter(name, documentation, labels)


def gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> Gauge:
    return Gauge(name, documentation, labels)


def histogram(
    name: str, documentation: str, labels: Sequence[str] = (), *, buckets: Sequence[float]
) -> Histogram:
    return Histogram(name, documentation, labels, buckets=buckets)


def configure(service: str) -> MeterProvider:
    """Install the process's MeterProvider, read by prometheus_client at each scrape.

    Idempotent: a second call (another service name included) returns the first provider.
    """
    global _provider
    with _lock:
        if _provider is not None:
            return _provider
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            log.warning("OTEL_SDK_DISABLED=true: no mailrail_* metrics at /metrics")
        reader = PrometheusMetricReader(
            scope_info_enabled=False, cardinality_limits={ObservableGauge: GAUGE_SERIES_LIMIT}
        )
        _provider = MeterProvider(
            metric_readers=[reader],
            resource=tracing.resource(service),
            # Prometheus' text format carries no exemplars: do not pay for them.
            exemplar_filter=AlwaysOffExemplarFilter(),
        )
        metrics.set_meter_provider(_provider)
        counters = list(_counters)
    for each in counters:
        each._export_zeros()
    return _provider


def exposition() -> tuple[bytes, str]:
    """What `/metrics` serves: the body and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
