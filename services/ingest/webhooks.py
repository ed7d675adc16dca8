"""Delivery events to customers: per-tenant webhook endpoints, signed, retried, never in the way.

The dispatcher is the handler of its own consumer loop on `mail.events` (consumer group
`MAILRAIL_WEBHOOK_GROUP_ID`), so it cannot slow delivery: the pipeline never waits for it.
Each event record becomes at most one POST per matching endpoint:

    POST <url>
    Content-Type: application/json
    Mailrail-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>
    {"id": "<topic>-<partition>-<offset>", "event": <the DeliveryEvent>}

The receiver recomputes the HMAC over the raw body with its secret, compares in constant time,
and refuses timestamps older than a few minutes (`verify_signature`). `id` is stable across
retries and redeliveries: delivery is at least once, receivers deduplicate by it.

A failed POST (network error, timeout, 408, 425, 429, 5xx) is retried with exponential backoff;
other answers and exhausted retries send the event to `mail.rejected` with the reason, so
nothing is dropped silently. The record's offset is committed only after that.

Isolation between tenants. In-flight events are bounded by the loop, across tenants
(`MAILRAIL_WEBHOOK_MAX_IN_FLIGHT`; past it every partition pauses), so an event held for one
endpoint holds a slot every tenant needs. Hence each endpoint (per tenant) has its own
concurrency limit and its own circuit breaker, and a broken endpoint lets go of its slots:

- every POST has a total deadline (`MAILRAIL_WEBHOOK_TIMEOUT_S`), however the endpoint trickles;
- `BREAKER_FAILURES` retryable failures in a row (timeouts, refused connections, 408/425/429,
  5xx; any other answer resets the count) open the endpoint's circuit for
  `BREAKER_COOLDOWN_S`: each of its events, new or already held (waiting for a POST slot or
  for its next retry), goes to `mail.rejected` at once instead of waiting;
- after the cooldown one probe goes (the others keep being rejected while it runs); its
  success closes the circuit, its failure opens it again.

So an endpoint that starts hanging lets go of its held events about one POST timeout later
(its few POSTs still under way time out in their turn); one that refuses connections, after
its first few attempts. What stays shared: an endpoint that answers, only slowly (or fails
often, but never `BREAKER_FAILURES` times in a row), and gets more events than it takes,
keeps them in flight until it answers.
"""

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import httpx
import orjson
import yaml
from confluent_kafka import Message
from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter

from schemas.records import EventType
from services.runtime.loop import BadRecord, Output, rejected_output

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Mailrail-Signature"
MAX_BACKOFF_S = 300.0
ENDPOINT_CONCURRENCY = 16
#: Retryable failures in a row that open an endpoint's circuit (one hung endpoint fails
#: `ENDPOINT_CONCURRENCY` POSTs at once when they time out).
BREAKER_FAILURES = 10
BREAKER_COOLDOWN_S = 60.0
CIRCUIT_OPEN = "endpoint failing, circuit open"
_RETRYABLE = frozenset({408, 425, 429})

Sleep = Callable[[float], Awaitable[None]]


class WebhookEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(pattern=r"^https?://[^\s]+$")
    secret: SecretStr = Field(min_length=16)
    #: Event types to send (default: every type).
    events: frozenset[EventType] | None = None


Webhooks = dict[str, list[WebhookEndpoint]]
_WEBHOOKS = TypeAdapter(Webhooks)


def load_webhooks(path: Path | None, inline: SecretStr | None) -> Webhooks:
    """Tenant → endpoints, from a YAML/JSON file and/or inline JSON (merged)."""
    hooks: Webhooks = {}
    if path is not None:
        hooks |= _WEBHOOKS.validate_python(yaml.safe_load(path.read_text()) or {})
    if inline is not None and inline.get_secret_value().strip():
        hooks |= _WEBHOOKS.validate_python(json.loads(inline.get_secret_value()))
    return hooks


def sign(secret: str, body: bytes, timestamp: int) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify_signature(
    secret: str, header: str, body: bytes, tolerance_s: float = 300.0, now_s: float | None = None
) -> bool:
    """What a receiver does: the signature matches and its timestamp is recent."""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    now = time.time() if now_s is None else now_s
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).rpartition("v1=")[2]
    return hmac.compare_digest(expected, parts.get("v1", ""))


class _Endpoint:
    """One tenant's endpoint: its POST slots and its circuit breaker (event-loop thread only).

    Closed (`open_until` None): every attempt goes. Open: none goes until `open_until`.
    Half-open (after it): one probe goes at a time; the others are refused meanwhile.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.slots = asyncio.Semaphore(ENDPOINT_CONCURRENCY)
        self.failures = 0
        self.open_until: float | None = None
        self.probing = False
        #: Set while the circuit is not closed: wakes events waiting for their next retry.
        self.opened = asyncio.Event()
        self._clock = clock

    def refusing(self) -> bool:
        """True while no attempt may go (open, or half-open with its probe running)."""
        if self.open_until is None:
            return False
        return self.probing or self._clock() < self.open_until

    def admit(self) -> bool | None:
        """None: no attempt may go now. Else it goes, and True says it is the probe."""
        if self.refusing():
            return None
        if self.open_until is None:
            return False
        self.probing = True
        return True

    def record(self, healthy: bool, probe: bool) -> None:
        """An attempt's outcome: `healthy` unless it was a retryable failure."""
        if probe:
            self.probing = False
        if healthy:
            self.failures = 0
            self.open_until = None
            self.opened.clear()
            return
        self.failures += 1
        if self.open_until is not None or self.failures >= BREAKER_FAILURES:
            if self.open_until is None:
                log.warning("webhook endpoint failing, circuit open")
            self.open_until = self._clock() + BREAKER_COOLDOWN_S
            self.opened.set()


class WebhookDispatcher:
    """The consumer-loop handler: POST one event to its tenant's endpoints."""

    def __init__(
        self,
        webhooks: Webhooks,
        *,
        max_attempts: int,
        backoff_s: float,
        timeout_s: float,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock` times the circuit breakers, `sleep` waits between attempts, `wall_clock`
        stamps signatures: injectable for tests."""
        self._webhooks = webhooks
        self._max_attempts = max(1, max_attempts)
        self._backoff_s = backoff_s
        self._timeout_s = timeout_s
        self._client = client or httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._endpoints = {
            (tenant, e.url): _Endpoint(clock)
            for tenant, endpoints in webhooks.items()
            for e in endpoints
        }

    async def __call__(self, message: Message) -> Sequence[Output]:
        value = message.value()
        if not value:
            return []
        try:
            head = orjson.loads(value)
            tenant, kind = str(head.get("tenant", "")), EventType(head.get("type"))
        except (orjson.JSONDecodeError, ValueError, AttributeError):
            return []  # not an event: the pipeline's own consumers deal with it
        endpoints = [
            e for e in self._webhooks.get(tenant, ()) if e.events is None or kind in e.events
        ]
        if not endpoints:
            return []
        event_id = f"{message.topic()}-{message.partition()}-{message.offset()}"
        body = b'{"id":' + orjson.dumps(event_id) + b',"event":' + value + b"}"
        results = await asyncio.gather(*(self._deliver(tenant, e, body) for e in endpoints))
        failed = [(url, why) for url, why in results if why is not None]
        if not failed:
            return []
        reason = "; ".join(f"webhook {url}: {why}" for url, why in failed)
        return [rejected_output(message, BadRecord(reason, "webhook_failed", failed[0][0]))]

    def backoff_s(self, attempt: int) -> float:
        """The wait before attempt number `attempt` (1 is the first retry)."""
        return min(MAX_BACKOFF_S, self._backoff_s * 2.0 ** (attempt - 1))

    async def _deliver(
        self, tenant: str, endpoint: WebhookEndpoint, body: bytes
    ) -> tuple[str, str | None]:
        """(url, None) once delivered; (url, reason) when given up."""
        state = self._endpoints[(tenant, endpoint.url)]
        reason: str | None = None
        for attempt in range(self._max_attempts):
            if attempt and not await self._wait_to_retry(state, self.backoff_s(attempt)):
                return endpoint.url, f"{reason}; then {CIRCUIT_OPEN}"
            outcome = await self._attempt(state, endpoint, body)
            if outcome is None:
                return (
                    endpoint.url,
                    CIRCUIT_OPEN if reason is None else f"{reason}; then {CIRCUIT_OPEN}",
                )
            retry, reason = outcome
            if reason is None:
                return endpoint.url, None
            if not retry:
                break
        log.warning("webhook given up", extra={"tenant": tenant, "reason": reason})
        return endpoint.url, reason

    async def _wait_to_retry(self, state: _Endpoint, delay_s: float) -> bool:
        """Wait `delay_s`; False (at once) if the endpoint's circuit is or gets open."""
        sleeping = asyncio.ensure_future(self._sleep(delay_s))
        opened = asyncio.ensure_future(state.opened.wait())
        try:
            await asyncio.wait({sleeping, opened}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            opened.cancel()
        return not state.opened.is_set()

    async def _attempt(
        self, state: _Endpoint, endpoint: WebhookEndpoint, body: bytes
    ) -> tuple[bool, str | None] | None:
        """One POST: (retry?, failure reason or None), or None when the circuit refused it."""
        if state.refusing():
            return None
        async with state.slots:
            probe = state.admit()
            if probe is None:
                return None
            try:
                retry, reason = await self._post(endpoint, body)
            except BaseException:
                if probe:
                    state.probing = False
                raise
            state.record(healthy=not retry, probe=probe)
            return retry, reason

    async def _post(self, endpoint: WebhookEndpoint, body: bytes) -> tuple[bool, str | None]:
        """(retry?, failure reason or None)."""
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(
                endpoint.secret.get_secret_value(), body, int(self._wall_clock())
            ),
        }
        try:
            async with asyncio.timeout(self._timeout_s):
                answer = await self._client.post(endpoint.url, content=body, headers=headers)
        except TimeoutError:
            return True, f"no answer within {self._timeout_s:g} s"
        except httpx.HTTPError as exc:
            return True, f"{type(exc).__name__}: {exc}"
        if 200 <= answer.status_code < 300:
            return False, None
        retry = answer.status_code in _RETRYABLE or answer.status_code >= 500
        return retry, f"HTTP {answer.status_code}"

    async def close(self) -> None:
        await self._client.aclose()
