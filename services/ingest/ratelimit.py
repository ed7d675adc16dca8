"""Per-tenant ingest rate limits: a token bucket of recipients per tenant, in this replica.

Each replica enforces the configured rate on its own, so N replicas behind a load balancer
admit up to N times the rate; configure `rate / replicas`. A limit shared across replicas
would need a round trip to a shared store on every request (Kafka is not one), which the
latency budget of `POST /v1/messages` cannot pay; per-replica buckets are what the
autoscaler's replica count makes predictable.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


def parse_rates(text: str) -> dict[str, float]:
    """`acme:500,globex:2000` → {"acme": 500.0, "globex": 2000.0}."""
    rates: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        tenant, sep, rate = item.partition(":")
        try:
            value = float(rate)
        except ValueError:
            value = -1.0
        if not sep or not tenant or value <= 0:
            raise ValueError(
                f"MAILRAIL_TENANT_RATES: expected tenant:recipients_per_s, got {item!r}"
            )
        rates[tenant] = value
    return rates


class RateLimiter:
    """`take(tenant, n)` admits n recipients or says how many seconds until it could.

    A request larger than the bucket passes when the bucket is full and leaves it in debt,
    so any valid request can pass after a pause and the average rate still holds.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        overrides: dict[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate_per_s
        self._burst = burst
        self._overrides = overrides or {}
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def _limits(self, tenant: str) -> tuple[float, float]:
        """(rate, capacity): an overridden rate scales the burst with it."""
        rate = self._overrides.get(tenant, self._rate)
        scale = rate / self._rate if self._rate > 0 else 1.0
        return rate, max(1.0, self._burst * scale)

    def take(self, tenant: str, n: int) -> float:
        """0.0 if admitted (tokens taken); else the seconds to wait before retrying."""
        rate, capacity = self._limits(tenant)
        now = self._clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = _Bucket(capacity, now)
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        needed = min(float(n), capacity)
        if bucket.tokens >= needed:
            bucket.tokens -= n
            return 0.0
        return (needed - bucket.tokens) / rate

    @staticmethod
    def retry_after(wait_s: float) -> str:
        """The `Retry-After` header value: whole seconds, at least 1."""
        return str(max(1, math.ceil(wait_s)))
