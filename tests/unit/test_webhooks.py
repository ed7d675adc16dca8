"""The webhook dispatcher against a scripted HTTP transport, with an injected clock and sleep:
signatures, retries and backoff, giving up, routing per tenant and event type, the circuit
breaker, and one tenant's broken endpoint letting go of what every tenant shares."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import httpx
import orjson
import pytest
from confluent_kafka import Message
from pydantic import SecretStr

from schemas.catalogue import REJECTED
from schemas.records import EventType, RejectedHeaders
from services.ingest.webhooks import (
    BREAKER_COOLDOWN_S,
    BREAKER_FAILURES,
    CIRCUIT_OPEN,
    ENDPOINT_CONCURRENCY,
    MAX_BACKOFF_S,
    SIGNATURE_HEADER,
    WebhookDispatcher,
    WebhookEndpoint,
    Webhooks,
    sign,
    verify_signature,
)
from services.runtime.loop import Output

SECRET = "whsec-unit-0123456789abcdef"
ACME_URL = "https://hooks.acme.example/mailrail"
GLOBEX_URL = "https://hooks.globex.example/mailrail"

Reply = Callable[[httpx.Request], Awaitable[httpx.Response]]


def endpoint(url: str, *events: str, secret: str = SECRET) -> WebhookEndpoint:
    return WebhookEndpoint(
        url=url,
        secret=SecretStr(secret),
        events=frozenset(EventType(e) for e in events) if events else None,
    )


def event(tenant: str = "acme", kind: str = "delivered", offset: int = 7) -> Message:
    value = orjson.dumps(
        {
            "v": 1,
            "type": kind,
            "message_id": f"m{offset}",
            "tenant": tenant,
            "recipient": "x@example.com",
            "ts": "2026-04-02T09:30:00Z",
        }
    )
    return Message(topic="mail.events", partition=3, offset=offset, key=b"m", value=value)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Sleeps:
    """A sleep that returns at once and remembers how long it was asked for."""

    delays: list[float] = field(default_factory=list)

    async def __call__(self, delay_s: float) -> None:
        self.delays.append(delay_s)


@dataclass
class Endpoints:
    """The HTTP side: each URL answers with its script; every request is kept."""

    replies: dict[str, Reply]
    requests: list[httpx.Request] = field(default_factory=list)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.replies[str(request.url)](request)

    def to(self, url: str) -> list[httpx.Request]:
        return [r for r in self.requests if str(r.url) == url]


def status(code: int) -> Reply:
    async def reply(_: httpx.Request) -> httpx.Response:
        return httpx.Response(code)

    return reply


def script(*codes: int) -> Reply:
    """Answers these codes in turn, then 204."""
    left = list(codes)

    async def reply(_: httpx.Request) -> httpx.Response:
        return httpx.Response(left.pop(0) if left else 204)

    return reply


def hang(release: asyncio.Event | None = None, code: int = 204) -> Reply:
    """Answers nothing until `release` is set (never, without one)."""

    async def reply(_: httpx.Request) -> httpx.Response:
        await (release or asyncio.Event()).wait()
        return httpx.Response(code)

    return reply


def refuse() -> Reply:
    async def reply(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    return reply


Make = Callable[..., tuple[WebhookDispatcher, Endpoints]]


@pytest.fixture
def make() -> Iterator[Make]:
    """Dispatcher factory: `make(webhooks, replies, **options)`."""
    clients: list[httpx.AsyncClient] = []

    def build(
        webhooks: Webhooks,
        replies: dict[str, Reply],
        *,
        max_attempts: int = 3,
        backoff_s: float = 1.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> tuple[WebhookDispatcher, Endpoints]:
        endpoints = Endpoints(replies)
        client = httpx.AsyncClient(transport=httpx.MockTransport(endpoints.handle))
        clients.append(client)
        dispatcher = WebhookDispatcher(
            webhooks,
            max_attempts=max_attempts,
            backoff_s=backoff_s,
            timeout_s=timeout_s,
            client=client,
            clock=clock,
            sleep=sleep or Sleeps(),
            wall_clock=wall_clock,
        )
        return dispatcher, endpoints

    yield build


def rejected_reason(outputs: Sequence[Output]) -> str:
    (output,) = outputs
    assert output.topic == REJECTED
    headers = dict(output.headers or [])
    assert headers[RejectedHeaders.CODE] == b"webhook_failed"
    return headers[RejectedHeaders.REASON].decode()


# Signatures


async def test_each_post_is_signed_over_timestamp_dot_body(make: Make) -> None:
    dispatcher, http = make(
        {"acme": [endpoint(ACME_URL)]}, {ACME_URL: status(204)}, wall_clock=lambda: 1_700_000_000.9
    )
    message = event(offset=42)
    assert await dispatcher(message) == []
    (request,) = http.requests
    body = request.content
    assert orjson.loads(body) == {
        "id": "mail.events-3-42",
        "event": orjson.loads(message.value() or b""),
    }
    assert request.headers["Content-Type"] == "application/json"
    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert request.headers[SIGNATURE_HEADER] == f"t=1700000000,v1={expected}"
    assert len(expected) == 64


@pytest.mark.parametrize(
    ("header", "body", "secret", "now_s", "valid"),
    [
        (sign(SECRET, b"{}", 1000), b"{}", SECRET, 1000.0, True),
        (sign(SECRET, b"{}", 1000), b"{}", SECRET, 1300.0, True),  # at the tolerance
        (sign(SECRET, b"{}", 1000), b"{}", SECRET, 1301.0, False),  # too old
        (sign(SECRET, b"{}", 1000), b"{}", SECRET, 699.0, False),  # from the future
        (sign(SECRET, b"{}", 1000), b"{ }", SECRET, 1000.0, False),  # body changed
        (sign(SECRET, b"{}", 1000), b"{}", SECRET + "x", 1000.0, False),  # other secret
        (sign(SECRET, b"{}", 1000).replace("t=1000", "t=1001"), b"{}", SECRET, 1000.0, False),
        ("v1=" + "0" * 64, b"{}", SECRET, 1000.0, False),  # no timestamp
        ("t=soon,v1=" + "0" * 64, b"{}", SECRET, 1000.0, False),
        ("t=1000", b"{}", SECRET, 1000.0, False),  # no signature
        ("", b"{}", SECRET, 1000.0, False),
    ],
)
def test_verify_signature(header: str, body: bytes, secret: str, now_s: float, valid: bool) -> None:
    assert verify_signature(secret, header, body, tolerance_s=300, now_s=now_s) is valid


# Retries, backoff, giving up


async def test_backoff_doubles_from_backoff_s_until_max_attempts_then_gives_up(make: Make) -> None:
    sleeps = Sleeps()
    dispatcher, http = make(
        {"acme": [endpoint(ACME_URL)]},
        {ACME_URL: status(503)},
        max_attempts=6,
        backoff_s=1.5,
        sleep=sleeps,
    )
    message = event()
    outputs = await dispatcher(message)
    assert len(http.requests) == 6
    assert sleeps.delays == [1.5, 3.0, 6.0, 12.0, 24.0]
    assert rejected_reason(outputs) == f"webhook {ACME_URL}: HTTP 503"
    (output,) = outputs
    assert output.value == message.value() and output.key == message.key()
    assert dict(output.headers or [])[RejectedHeaders.FIELD] == ACME_URL.encode()


async def test_backoff_is_capped(make: Make) -> None:
    sleeps = Sleeps()
    dispatcher, _ = make(
        {"acme": [endpoint(ACME_URL)]},
        {ACME_URL: status(500)},
        max_attempts=5,
        backoff_s=100.0,
        sleep=sleeps,
    )
    await dispatcher(event())
    assert sleeps.delays == [100.0, 200.0, MAX_BACKOFF_S, MAX_BACKOFF_S]


@pytest.mark.parametrize(
    ("reply", "posts", "reason"),
    [
        (script(503, 502), 3, None),  # retried until it answers
        (script(408, 425, 429), 4, None),
        (status(429), 4, "HTTP 429"),
        (status(400), 1, "HTTP 400"),  # another 4xx is not retried
        (status(410), 1, "HTTP 410"),
        (status(302), 1, "HTTP 302"),  # redirects are not followed
        (refuse(), 4, "ConnectError: connection refused"),
    ],
)
async def test_what_is_retried(make: Make, reply: Reply, posts: int, reason: str | None) -> None:
    dispatcher, http = make({"acme": [endpoint(ACME_URL)]}, {ACME_URL: reply}, max_attempts=4)
    outputs = await dispatcher(event())
    assert len(http.requests) == posts
    if reason is None:
        assert outputs == []
    else:
        assert rejected_reason(outputs) == f"webhook {ACME_URL}: {reason}"


async def test_an_endpoint_that_never_answers_times_out_and_is_retried(make: Make) -> None:
    dispatcher, http = make(
        {"acme": [endpoint(ACME_URL)]}, {ACME_URL: hang()}, max_attempts=2, timeout_s=0.05
    )
    started = time.monotonic()
    outputs = await dispatcher(event())
    assert time.monotonic() - started < 1.0
    assert len(http.requests) == 2
    assert rejected_reason(outputs) == f"webhook {ACME_URL}: no answer within 0.05 s"


# Routing


async def test_events_go_to_their_tenants_endpoints_that_want_their_type(make: Make) -> None:
    every, failures, other = (
        "https://a.example/all",
        "https://a.example/failures",
        "https://g.example/accepted",
    )
    dispatcher, http = make(
        {
            "acme": [endpoint(every), endpoint(failures, "bounced", "complained")],
            "globex": [endpoint(other, "accepted")],
        },
        {url: status(204) for url in (every, failures, other)},
    )
    cases = [
        (event("acme", "bounced", 1), {every, failures}),
        (event("acme", "delivered", 2), {every}),
        (event("globex", "accepted", 3), {other}),
        (event("globex", "delivered", 4), set()),
        (event("initech", "bounced", 5), set()),  # a tenant without webhooks
    ]
    for message, urls in cases:
        before = len(http.requests)
        assert await dispatcher(message) == []
        assert {str(r.url) for r in http.requests[before:]} == urls, message.offset()
    ids = [orjson.loads(r.content)["id"] for r in http.to(every)]
    assert ids == ["mail.events-3-1", "mail.events-3-2"]


@pytest.mark.parametrize("value", [b"", b"not json", b"[1, 2]", b'{"tenant": "acme"}'])
async def test_records_that_are_not_events_are_ignored(make: Make, value: bytes) -> None:
    dispatcher, http = make({"acme": [endpoint(ACME_URL)]}, {ACME_URL: status(204)})
    message = Message(topic="mail.events", partition=0, offset=1, value=value)
    assert await dispatcher(message) == [] and http.requests == []


async def test_one_failing_endpoint_of_a_tenant_rejects_the_event_naming_it(make: Make) -> None:
    good, bad = "https://a.example/good", "https://a.example/bad"
    dispatcher, http = make(
        {"acme": [endpoint(good), endpoint(bad)]}, {good: status(204), bad: status(404)}
    )
    outputs = await dispatcher(event())
    assert len(http.to(good)) == 1
    assert rejected_reason(outputs) == f"webhook {bad}: HTTP 404"


# The circuit breaker


async def fail_in_a_row(dispatcher: WebhookDispatcher, count: int, first_offset: int = 100) -> None:
    for offset in range(first_offset, first_offset + count):
        await dispatcher(event(offset=offset))


async def test_failures_in_a_row_open_the_circuit_then_one_probe_closes_it(make: Make) -> None:
    clock = Clock()
    answers = {"code": 503}

    async def reply(_: httpx.Request) -> httpx.Response:
        return httpx.Response(answers["code"])

    dispatcher, http = make(
        {"acme": [endpoint(ACME_URL)], "globex": [endpoint(ACME_URL)]},
        {ACME_URL: reply},
        max_attempts=1,
        clock=clock,
    )
    await fail_in_a_row(dispatcher, BREAKER_FAILURES - 1)
    assert len(http.requests) == BREAKER_FAILURES - 1
    assert "HTTP 503" in rejected_reason(await dispatcher(event()))  # the last one that goes
    # Open: rejected at once, without a POST.
    assert rejected_reason(await dispatcher(event())) == f"webhook {ACME_URL}: {CIRCUIT_OPEN}"
    assert len(http.requests) == BREAKER_FAILURES
    # Per tenant: globex's endpoint (the same URL) is its own.
    assert "HTTP 503" in rejected_reason(await dispatcher(event("globex")))
    assert len(http.requests) == BREAKER_FAILURES + 1
    clock.now += BREAKER_COOLDOWN_S - 1
    assert CIRCUIT_OPEN in rejected_reason(await dispatcher(event()))
    # Half-open: a probe goes; it fails, so the circuit opens again for a full cooldown.
    clock.now += 1
    assert "HTTP 503" in rejected_reason(await dispatcher(event()))
    assert CIRCUIT_OPEN in rejected_reason(await dispatcher(event()))
    clock.now += BREAKER_COOLDOWN_S
    answers["code"] = 204
    assert await dispatcher(event()) == []  # the probe succeeds: closed again
    assert await dispatcher(event()) == []
    assert len(http.to(ACME_URL)) == BREAKER_FAILURES + 4


async def test_a_success_or_another_answer_resets_the_count(make: Make) -> None:
    codes = [503] * (BREAKER_FAILURES - 1) + [204] + [503] * (BREAKER_FAILURES - 1)
    codes += [400] * (BREAKER_FAILURES * 2) + [503]
    dispatcher, http = make(
        {"acme": [endpoint(ACME_URL)]}, {ACME_URL: script(*codes)}, max_attempts=1
    )
    await fail_in_a_row(dispatcher, len(codes))
    assert await dispatcher(event()) == []  # still closed: the script's 204 came through
    assert len(http.requests) == len(codes) + 1


async def test_while_the_probe_runs_other_events_are_refused(make: Make) -> None:
    clock = Clock()
    release = asyncio.Event()
    replies = {"hang": False}

    async def reply(request: httpx.Request) -> httpx.Response:
        if replies["hang"]:
            return await hang(release)(request)
        return httpx.Response(503)

    dispatcher, http = make(
        {"acme": [endpoint(ACME_URL)]}, {ACME_URL: reply}, max_attempts=1, clock=clock
    )
    await fail_in_a_row(dispatcher, BREAKER_FAILURES)
    clock.now += BREAKER_COOLDOWN_S
    replies["hang"] = True
    probe = asyncio.create_task(dispatcher(event(offset=1)))
    while len(http.requests) == BREAKER_FAILURES:
        await asyncio.sleep(0)
    assert CIRCUIT_OPEN in rejected_reason(await dispatcher(event(offset=2)))
    release.set()
    assert await probe == []
    assert await dispatcher(event(offset=3)) == []
    assert len(http.requests) == BREAKER_FAILURES + 2


async def test_events_waiting_to_retry_give_up_as_soon_as_the_circuit_opens(make: Make) -> None:
    async def forever(_: float) -> None:
        await asyncio.Event().wait()

    dispatcher, http = make(
        {"acme": [endpoint(ACME_URL)]}, {ACME_URL: status(503)}, max_attempts=6, sleep=forever
    )
    waiting = [asyncio.create_task(dispatcher(event(offset=i))) for i in range(BREAKER_FAILURES)]
    while len(http.requests) < BREAKER_FAILURES:
        await asyncio.sleep(0)
    async with asyncio.timeout(1):
        results = await asyncio.gather(*waiting)
    for outputs in results:
        assert rejected_reason(outputs) == f"webhook {ACME_URL}: HTTP 503; then {CIRCUIT_OPEN}"
    assert len(http.requests) == BREAKER_FAILURES  # none was tried again


# Isolation


async def test_a_hanging_endpoint_lets_go_within_one_timeout_and_others_are_not_held(
    make: Make,
) -> None:
    """One tenant's endpoint hangs while it has many more events than its POST slots: they
    are all given up about one POST timeout later (not after every attempt of every event),
    and another tenant's events are delivered meanwhile."""
    timeout_s = 0.5
    dispatcher, http = make(
        {"acme": [endpoint(ACME_URL)], "globex": [endpoint(GLOBEX_URL)]},
        {ACME_URL: hang(), GLOBEX_URL: status(204)},
        max_attempts=6,
        timeout_s=timeout_s,
    )
    started = time.monotonic()
    stuck = [
        asyncio.create_task(dispatcher(event(offset=i))) for i in range(5 * ENDPOINT_CONCURRENCY)
    ]
    while len(http.to(ACME_URL)) < ENDPOINT_CONCURRENCY:
        await asyncio.sleep(0)
    others = await asyncio.gather(*(dispatcher(event("globex", offset=i)) for i in range(20)))
    assert others == [[]] * 20
    assert not any(task.done() for task in stuck)  # delivered while acme's still hang
    results = await asyncio.gather(*stuck)
    elapsed = time.monotonic() - started
    # Without the breaker letting go: 80 events x 6 attempts / 16 slots = 30 timeouts.
    assert elapsed < 4 * timeout_s, elapsed
    assert all(CIRCUIT_OPEN in rejected_reason(r) for r in results)
    # A few waiting events may start before the last failure counts; none is retried.
    assert len(http.to(ACME_URL)) < 2 * ENDPOINT_CONCURRENCY
