"""The load generator: submissions through `mail.submit` and `POST /v1/messages`, alternately.

Each submission is one message (a ~5 KB text body) to `count` recipients spread round-robin
over `DOMAINS` domains. Its accept time is when Kafka acknowledged our `mail.submit` record
(the producer's delivery report) or when ingest answered 202 — in both cases the moment the
pipeline has taken responsibility for the mail.

Two shapes of load, both bounded in count and time:
- `closed_loop`: as fast as the pipeline drains, keeping at most `window` recipients
  submitted but not yet received by the sink (every stage busy, none flooded): the maximum
  sustained rate.
- `open_loop`: submissions at fixed times (rate x duration), whatever the pipeline does
  — late answers do not slow the schedule, so latency is not hidden (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from confluent_kafka import KafkaError, Message, Producer

#: The contract's topic name (design.md); the services run without a topic prefix.
SUBMIT = "mail.submit"

log = logging.getLogger(__name__)

DOMAINS = 64
TENANT = "bench"
API_KEY = "bench-key"
SENDER = "Bench <bench@mailrail.example>"
TEXT_BYTES = 4800
HTTP_RETRIES = 3
HTTP_TIMEOUT_S = 30.0
HTTP_CONNECTIONS = 64
#: How long the end of a phase waits for the delivery reports of its last `mail.submit` records.
PRODUCE_ACK_TIMEOUT_S = 30.0
#: Open loop: past this many HTTP requests awaiting an answer, the generator is overloaded.
MAX_OUTSTANDING_HTTP = 512
#: Closed loop: most HTTP requests in flight at once.
MAX_HTTP_PARALLEL = 32


def body_text(size: int = TEXT_BYTES) -> str:
    """ASCII prose in 72-character lines: quoted-printable leaves it as it is."""
    words = [
        "Mailrail",
        "bench",
        "message:",
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "while",
        "the",
        "pipeline",
        "relays",
        "every",
        "recipient",
        "of",
        "this",
        "campaign",
        "through",
        "Kafka",
        "to",
        "the",
        "sink.",
    ]
    lines, line, total = [], "", 0
    index = 0
    while total < size:
        word = words[index % len(words)]
        index += 1
        if len(line) + len(word) + 1 > 72:
            lines.append(line)
            total += len(line) + 1
            line = ""
        line = f"{line} {word}" if line else word
    return "\n".join(lines) + "\n"


TEXT = body_text()


def recipients(phase: int, submission: int, count: int, first_domain: int) -> list[str]:
    return [
        f"b{phase}s{submission}r{i}@d{(first_domain + i) % DOMAINS:02d}.bench.example"
        for i in range(count)
    ]


def submission_body(phase: int, submission: int, count: int, *, tenant: str | None) -> bytes:
    body: dict[str, Any] = {
        "from": SENDER,
        "to": recipients(phase, submission, count, submission * count),
        "subject": f"Bench phase {phase} submission {submission}",
        "text": TEXT,
        "tags": ["bench"],
    }
    if tenant is not None:
        body["tenant"] = tenant
    return orjson.dumps(body)


@dataclass
class PhaseLoad:
    """What was submitted in one phase and when each submission was accepted."""

    phase: int
    per_submission: int
    #: submission -> (path, scheduled epoch s, accepted epoch s or None)
    submissions: dict[int, tuple[str, float, float | None]] = field(default_factory=dict)
    accepted_recipients: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    started_t: float = 0.0
    last_submit_t: float = 0.0
    late_submissions: int = 0

    def accepted_at(self, submission: int) -> float | None:
        entry = self.submissions.get(submission)
        return None if entry is None else entry[2]


class Submitter:
    def __init__(self, bootstrap: str, http_url: str) -> None:
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 2,
                "compression.type": "lz4",
                "message.max.bytes": 20 * 1024 * 1024,
                "log_level": 0,
            }
        )
        self._http_url = http_url
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="submit-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.05)

    def acknowledged(self, timeout_s: float = PRODUCE_ACK_TIMEOUT_S) -> None:
        """Block until every record produced so far has its delivery report, so that
        `accepted_recipients` counts them all (a phase judged before would miss the last)."""
        self._producer.flush(timeout_s)

    def close(self) -> None:
        self._producer.flush(30)
        self._closed.set()
        self._poller.join(timeout=5)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self._http_url,
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
            timeout=HTTP_TIMEOUT_S,
            limits=httpx.Limits(max_connections=HTTP_CONNECTIONS),
        )

    def produce(self, load: PhaseLoad, submission: int, count: int) -> None:
        scheduled = time.time()
        value = submission_body(load.phase, submission, count, tenant=TENANT)

        def on_delivery(error: KafkaError | None, _: Message) -> None:
            with self._lock:
                if error is None:
                    load.submissions[submission] = ("kafka", scheduled, time.time())
                    load.accepted_recipients += count
                else:
                    load.errors[f"kafka: {error.str()}"] += 1

        with self._lock:
            load.submissions[submission] = ("kafka", scheduled, None)
        while True:
            try:
                # No key: a record key is an idempotency key, and the HTTP path sends none.
                self._producer.produce(SUBMIT, value, on_delivery=on_delivery)
                return
            except BufferError:
                time.sleep(0.01)

    async def post(
        self, client: httpx.AsyncClient, load: PhaseLoad, submission: int, count: int
    ) -> None:
        scheduled = time.time()
        with self._lock:
            load.submissions[submission] = ("http", scheduled, None)
        body = submission_body(load.phase, submission, count, tenant=None)
        for attempt in range(HTTP_RETRIES):
            try:
                answer = await client.post("/v1/messages", content=body)
            except httpx.HTTPError as exc:
                error = f"http: {type(exc).__name__}"
            else:
                if answer.status_code == 202:
                    with self._lock:
                        load.submissions[submission] = ("http", scheduled, time.time())
                        load.accepted_recipients += count
                    return
                error = f"http {answer.status_code}: {answer.text[:120]}"
            with self._lock:
                load.errors[error] += 1
            await asyncio.sleep(0.5 * 2**attempt)

    def pending_kafka(self) -> int:
        return len(self._producer)


async def closed_loop(
    submitter: Submitter,
    load: PhaseLoad,
    total: int,
    window: int,
    delivered: Callable[[], int],
    deadline: float,
) -> None:
    """Submit `total` recipients, `load.per_submission` per submission, keeping at most
    `window` recipients accepted but not yet `delivered()` (as counted by the sink).

    Half the submissions go through `mail.submit`, half through HTTP: one feeder produces,
    several post concurrently (enough to fill half the window), and neither path may run
    more than the HTTP feeders' worth of submissions ahead of the other.
    """
    per = load.per_submission
    http_parallel = max(2, min(MAX_HTTP_PARALLEL, window // (2 * per)))
    lead = http_parallel * per
    sent = {"kafka": 0, "http": 0}
    numbers = itertools.count()
    load.started_t = time.time()

    def may_submit(path: str) -> bool:
        other = "http" if path == "kafka" else "kafka"
        in_pipeline = sent["kafka"] + sent["http"] - delivered()
        return in_pipeline < window and sent[path] - sent[other] < lead

    async def feed(path: str, client: httpx.AsyncClient) -> None:
        while sent["kafka"] + sent["http"] < total and time.monotonic() < deadline:
            if not may_submit(path):
                await asyncio.sleep(0.01)
                continue
            count = min(per, total - sent["kafka"] - sent["http"])
            sent[path] += count
            if path == "kafka":
                submitter.produce(load, next(numbers), count)
                await asyncio.sleep(0)
            else:
                await submitter.post(client, load, next(numbers), count)
        load.last_submit_t = max(load.last_submit_t, time.time())

    async with submitter.client() as client:
        feeders = [feed("kafka", client)] + [feed("http", client) for _ in range(http_parallel)]
        await asyncio.wait_for(
            asyncio.gather(*feeders), timeout=max(1.0, deadline - time.monotonic() + 60)
        )
    await asyncio.to_thread(submitter.acknowledged)


async def open_loop(
    submitter: Submitter, load: PhaseLoad, rate_per_s: float, duration_s: float
) -> None:
    """Submit at `rate_per_s` recipients per second for `duration_s`, on a fixed schedule."""
    loop = asyncio.get_running_loop()
    interval_s = load.per_submission / rate_per_s
    count = max(1, int(duration_s / interval_s))
    tasks: set[asyncio.Task[None]] = set()
    load.started_t = time.time()
    async with submitter.client() as client:
        start = loop.time()
        for submission in range(count):
            delay = start + submission * interval_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -interval_s:
                load.late_submissions += 1
            if submission % 2 == 0:
                submitter.produce(load, submission, load.per_submission)
            else:
                while len(tasks) >= MAX_OUTSTANDING_HTTP:
                    load.late_submissions += 1
                    await asyncio.sleep(0.01)
                task = asyncio.create_task(
                    submitter.post(client, load, submission, load.per_submission)
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        load.last_submit_t = time.time()
        if tasks:
            await asyncio.wait(tasks, timeout=HTTP_TIMEOUT_S * HTTP_RETRIES)
    await asyncio.to_thread(submitter.acknowledged)
