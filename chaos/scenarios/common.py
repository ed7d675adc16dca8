"""What most scenarios share: a pipeline relaying to a loopback sink, load, and judging."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

from chaos.load import Body, LoadResult, message, recipients_for
from chaos.oracle import EventReader, Join, Verdict, judge, wait_final
from chaos.stack import ChaosStack
from schemas.records import EventType
from tests.support.smtp_server import RunningSmtpServer, SmtpScript, start_smtp_server


@contextmanager
def sink_server(
    script: SmtpScript | None = None, host: str = "127.0.0.1"
) -> Iterator[RunningSmtpServer]:
    server = start_smtp_server(host, 0, script)
    try:
        yield server
    finally:
        server.stop()


class HasAddress(Protocol):
    @property
    def address(self) -> str: ...


def relay_stack(
    scenario: str,
    sink: HasAddress,
    *,
    senders: int = 1,
    bounce: bool = False,
    env: Mapping[str, str] | None = None,
    sender_env: Mapping[str, str] | None = None,
    static: bool = False,
    rules: Mapping[str, Any] | None = None,
) -> ChaosStack:
    """ingest, router, `senders` senders relaying to `sink` (each from its own address),
    and the bounce service if asked."""
    stack = ChaosStack(
        scenario, env={"MAILRAIL_SMART_HOST": sink.address, **(env or {})}, rules=rules
    )
    stack.add_ingest()
    stack.add_router()
    for index in range(senders):
        stack.add_sender(f"sender-{index}", index=index, static=static, **(sender_env or {}))
    if bounce:
        stack.add_bounce()
    return stack


def bodies(tag: str, messages: int, per_message: int, domains: int) -> list[Body]:
    return [
        message(tag, m, rcpts)
        for m, rcpts in enumerate(recipients_for(tag, messages, per_message, domains))
    ]


def settle_and_judge(
    verdict: Verdict,
    stack: ChaosStack,
    load: LoadResult,
    sinks: list[RunningSmtpServer],
    *,
    timeout_s: float,
    fault_end: float | None = None,
    expect: Mapping[str, EventType] | None = None,
    include_unanswered: bool = False,
    also: Callable[[], bool] | None = None,
) -> Join:
    """Wait (bounded) for every accepted recipient's final state, then judge."""
    reader = EventReader(stack.bootstrap, stack.topic("mail.events"))
    try:
        pairs = load.pairs
        settled = wait_final(reader, pairs, timeout_s, also=also)
        if not settled:
            verdict.note(f"not every recipient reached a final state within {timeout_s:.0f} s")
        messages = [m for s in sinks for m in s.messages]
        if include_unanswered:
            messages += [m for s in sinks for m in s.unanswered]
        join = judge(
            verdict,
            pairs,
            reader.events,
            messages,
            fault_end=fault_end,
            started=load.started,
            expect=expect,
        )
        if reader.unparsable:
            verdict.note(f"{reader.unparsable} unparsable records on mail.events")
        return join
    finally:
        reader.close()


def accepted_everything(verdict: Verdict, load: LoadResult, sent: int) -> bool:
    return verdict.check(
        "ingest accepted the load",
        sent > 0 and load.answers.get("202", 0) == sent,
        f"answers {dict(load.answers)}",
    )


def pick(rng: random.Random, names: list[str]) -> str:
    return names[rng.randrange(len(names))]


def wait_until(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return condition()
