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

A failed POST (network error, timeout, 408, 429, 5xx) is retried with exponential backoff;
other answers and exhausted retries send the event to `mail.rejected` with the reason, so
nothing is dropped silently. The record's offset is committed only after that. In-flight
events are bounded by the loop (`MAILRAIL_WEBHOOK_MAX_IN_FLIGHT`; past it the partitions
pause), and an endpoint that keeps failing is short-circuited for a while (its events go
straight to `mail.rejected`) so one dead endpoint cannot hold every slot.
"""

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
BREAKER_FAILURES = 5
BREAKER_COOLDOWN_S = 60.0
_RETRYABLE = frozenset({408, 425, 429})


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


@dataclass
class _Breaker:
    failures: int = 0
    open_until: float = 0.0


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
    ) -> None:
        self._webhooks = webhooks
        self._max_attempts = max(1, max_attempts)
        self._backoff_s = backoff_s
        self._client = client or httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
        self._clock = clock
        self._limits = {
            (tenant, e.url): asyncio.Semaphore(ENDPOINT_CONCURRENCY)
            for tenant, endpoints in webhooks.items()
            for e in endpoints
        }
        self._breakers: dict[tuple[str, str], _Breaker] = {}

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

    async def _deliver(
        self, tenant: str, endpoint: WebhookEndpoint, body: bytes
    ) -> tuple[str, str | None]:
        """(url, None) once delivered; (url, reason) when given up."""
        breaker = self._breakers.setdefault((tenant, endpoint.url), _Breaker())
        if self._clock() < breaker.open_until:
            return endpoint.url, "endpoint failing, circuit open"
        reason: str | None = "no attempt"
        for attempt in range(self._max_attempts):
            if attempt:
                await asyncio.sleep(min(MAX_BACKOFF_S, self._backoff_s * 2 ** (attempt - 1)))
            retry, reason = await self._post(tenant, endpoint, body)
            if reason is None:
                breaker.failures = 0
                return endpoint.url, None
            if not retry:
                break
        breaker.failures += 1
        if breaker.failures >= BREAKER_FAILURES:
            breaker.open_until = self._clock() + BREAKER_COOLDOWN_S
        log.warning("webhook given up", extra={"tenant": tenant, "reason": reason})
        return endpoint.url, reason or "failed"

    async def _post(
        self, tenant: str, endpoint: WebhookEndpoint, body: bytes
    ) -> tuple[bool, str | None]:
        """(retry?, failure reason or None)."""
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(endpoint.secret.get_secret_value(), body, int(time.time())),
        }
        try:
            async with self._limits[(tenant, endpoint.url)]:
                answer = await self._client.post(endpoint.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return True, f"{type(exc).__name__}: {exc}"
        if 200 <= answer.status_code < 300:
            return False, None
        retry = answer.status_code in _RETRYABLE or answer.status_code >= 500
        return retry, f"HTTP {answer.status_code}"

    async def close(self) -> None:
        await self._client.aclose()
