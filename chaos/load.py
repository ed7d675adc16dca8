"""Bounded HTTP load: a fixed number of messages, a fixed concurrency, a deadline.

Every answer is kept: a 202 names the recipients ingest accepted (the oracle's ground truth),
a 503 or a connection error names a message that must not be counted as accepted. The load
runs in its own thread (with its own event loop) so a scenario can inject faults meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

REQUEST_TIMEOUT_S = 30.0
Body = dict[str, Any]


@dataclass(frozen=True)
class Accepted:
    """One 202: the message id and every recipient with the status ingest answered."""

    message_id: str
    recipients: tuple[tuple[str, str], ...]
    at: float


@dataclass
class LoadResult:
    accepted: list[Accepted] = field(default_factory=list)
    #: Status code (or "error: <kind>") → how many requests got it.
    answers: Counter[str] = field(default_factory=Counter)
    #: Bodies of the requests that were not answered 2xx, with what they got.
    refused: list[tuple[Body, str]] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0
    unsent: int = 0

    @property
    def pairs(self) -> set[tuple[str, str]]:
        """(message id, recipient) of every recipient answered queued or suppressed."""
        return {(a.message_id, r) for a in self.accepted for r, _ in a.recipients}

    @property
    def recipients(self) -> int:
        return sum(len(a.recipients) for a in self.accepted)

    def merge(self, other: LoadResult) -> None:
        self.accepted += other.accepted
        self.answers.update(other.answers)
        self.refused += other.refused
        self.unsent += other.unsent
        self.started = min(self.started or other.started, other.started)
        self.finished = max(self.finished, other.finished)


def message(
    tag: str, index: int, recipients: Sequence[str | dict[str, Any]], body_bytes: int = 600
) -> Body:
    filler = ("chaos " * (body_bytes // 6 + 1))[:body_bytes]
    return {
        "from": "Chaos <chaos@acme.example>",
        "to": list(recipients),
        "subject": f"chaos {tag} {index}",
        "text": f"message {index} of {tag}\n{filler}\n",
        "tags": ["chaos", tag],
    }


def recipients_for(tag: str, messages: int, per_message: int, domains: int) -> list[list[str]]:
    """Unique addresses: message m goes to `per_message` recipients of domain d(m % domains)."""
    return [
        [f"r{m}-{j}-{tag}@d{m % domains}.chaos.example" for j in range(per_message)]
        for m in range(messages)
    ]


async def post_all(
    url: str,
    api_key: str,
    bodies: Sequence[Body],
    *,
    concurrency: int = 8,
    deadline_s: float = 120.0,
    spread_s: float = 0.0,
    on_answer: Callable[[int], None] | None = None,
) -> LoadResult:
    """POST every body (at most `concurrency` at once) until done or the deadline passes;
    with `spread_s`, body i is not posted before i/len(bodies) of that time has passed."""
    result = LoadResult(started=time.time())
    queue: asyncio.Queue[tuple[int, Body]] = asyncio.Queue()
    for item in enumerate(bodies):
        queue.put_nowait(item)
    begin = time.monotonic()
    end = begin + deadline_s
    step_s = spread_s / max(1, len(bodies))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=REQUEST_TIMEOUT_S,
        limits=limits,
    ) as client:

        async def worker() -> None:
            while time.monotonic() < end:
                try:
                    index, body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                if step_s:
                    await asyncio.sleep(max(0.0, begin + index * step_s - time.monotonic()))
                try:
                    answer = await client.post("/v1/messages", json=body)
                except httpx.HTTPError as exc:
                    kind = f"error: {type(exc).__name__}"
                    result.answers[kind] += 1
                    result.refused.append((body, kind))
                    await asyncio.sleep(0.05)
                    continue
                result.answers[str(answer.status_code)] += 1
                if answer.status_code == 202:
                    data = answer.json()
                    result.accepted.append(
                        Accepted(
                            data["id"],
                            tuple((r["email"], r["status"]) for r in data["recipients"]),
                            time.time(),
                        )
                    )
                else:
                    result.refused.append((body, str(answer.status_code)))
                if on_answer is not None:
                    on_answer(index)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.unsent = queue.qsize()
    result.finished = time.time()
    return result


class BackgroundLoad:
    """`post_all` in a thread of its own: `start()`, inject faults, then `join()`."""

    def __init__(self, url: str, api_key: str, bodies: Sequence[Body], **options: Any) -> None:
        self._args = (url, api_key, list(bodies))
        self._options = options
        self._result: LoadResult | None = None
        self._error: BaseException | None = None
        self.answered = 0
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)

    def _count(self, _index: int) -> None:
        self.answered += 1

    def _run(self) -> None:
        try:
            self._result = asyncio.run(
                post_all(*self._args, on_answer=self._count, **self._options)
            )
        except BaseException as exc:
            self._error = exc

    def start(self) -> BackgroundLoad:
        self._thread.start()
        return self

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout_s: float = 600.0) -> LoadResult:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError("the load did not finish")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def post_sync(url: str, api_key: str, bodies: Sequence[Body], **options: Any) -> LoadResult:
    return asyncio.run(post_all(url, api_key, bodies, **options))
