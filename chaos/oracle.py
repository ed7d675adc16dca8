"""The oracle: what ingest accepted, joined with what `mail.events` says and what the sinks got.

Ground truth is the 2xx answers of ingest (the recipients a client was told are queued or
suppressed). For each, `mail.events` must hold exactly one final state (delivered, bounced,
suppressed, expired; the same final state written twice counts as an extra event, two
different ones as a wrong state), and a recipient said to be delivered must have arrived at
a sink. Arrivals beyond the first are the duplicates. Events flagged "possible duplicate"
(no reply to the final dot) are counted, as are deliveries nobody was told were accepted.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]
from pydantic import ValidationError

from schemas.records import FINAL_EVENT_TYPES, DeliveryEvent, EventType
from tests.support.smtp_server import ReceivedMessage

POLL_S = 0.2
# Time a one-shot read may take to reach the end: a fresh reader's first fetch can take
# seconds on a loaded machine, and a judgement on half a topic is wrong either way.
CATCH_UP_S = 60.0
METADATA_TIMEOUT_S = 10.0
WATERMARK_ATTEMPTS = 10
Pair = tuple[str, str]


class EventReader:
    """Every record of a topic from its beginning, read on demand (no group, no commits)."""

    def __init__(self, bootstrap: str, topic: str, *, committed_only: bool = True) -> None:
        """`committed_only=False` also reads what aborted transactions left in the log."""
        self.topic = topic
        self._isolation = (
            IsolationLevel.READ_COMMITTED if committed_only else IsolationLevel.READ_UNCOMMITTED
        )
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"chaos-oracle-{topic}",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
                "isolation.level": "read_committed" if committed_only else "read_uncommitted",
                "log_level": 0,
            }
        )
        partitions = (
            self._consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S).topics[topic].partitions
        )
        self._admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
        self._partitions = list(partitions)
        self._positions: dict[int, int] = {}
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        self.events: list[DeliveryEvent] = []
        self.unparsable = 0
        self.raw: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
        #: (partition, offset) of each record of `raw`.
        self.positions: list[tuple[int, int]] = []

    def poll(self, budget_s: float = POLL_S) -> int:
        """Read everything written before this call (up to `budget_s`); returns how many
        records were new."""
        new, _ = self._read_to_end(budget_s)
        return new

    def catch_up(self) -> int:
        """Read everything written before this call, however long that takes (up to
        CATCH_UP_S; then fail rather than judge on part of the topic)."""
        new, behind = self._read_to_end(CATCH_UP_S)
        if behind:
            raise TimeoutError(f"{self.topic}: not read to its end in {CATCH_UP_S} s: {behind}")
        return new

    def _read_to_end(self, budget_s: float) -> tuple[int, dict[int, int]]:
        """(records read, the partitions → end offsets not reached when the budget ran out)."""
        new = 0
        end = time.monotonic() + budget_s
        targets = {}
        for partition, (low, high) in self._watermarks().items():
            if high > max(low, self._positions.get(partition, 0)):
                targets[partition] = high
        while targets and time.monotonic() < end:
            batch = self._consumer.consume(1000, max(0.0, min(POLL_S, end - time.monotonic())))
            if not batch:
                # Past the last record but short of the end offset: compacted away, or
                # transaction markers; the consumer's own position has moved past them.
                for tp in self._consumer.position([TopicPartition(self.topic, p) for p in targets]):
                    if tp.offset >= 0 and tp.offset >= targets[tp.partition]:
                        targets.pop(tp.partition, None)
            for message in batch:
                error = message.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        raise RuntimeError(f"reading {self.topic}: {error}")
                    continue
                partition = int(message.partition() or 0)
                self._positions[partition] = int(message.offset() or 0) + 1
                if self._positions[partition] >= targets.get(partition, 0):
                    targets.pop(partition, None)
                new += 1
                value = message.value()
                raw_headers: list[tuple[str, bytes | None]] = message.headers() or []  # type: ignore[assignment]
                headers = [(k, v or b"") for k, v in raw_headers]
                self.raw.append((message.key(), value, headers))
                self.positions.append((partition, int(message.offset() or 0)))
                try:
                    self.events.append(DeliveryEvent.model_validate_json(value or b""))
                except ValidationError:
                    self.unparsable += 1
        return new, targets

    def _watermarks(self) -> dict[int, tuple[int, int]]:
        """(low, end) per partition, asked on the admin client's own connection (a query on
        the consumer's would wait behind its fetches, or disturb them). The end is what this
        reader can reach (for `read_committed`, the last stable offset). A leader that just moved
        answers with a retriable error: asked again, a few times."""
        for attempt in range(WATERMARK_ATTEMPTS):
            try:
                return self._ask_watermarks()
            except KafkaException as exc:
                if not exc.args[0].retriable() or attempt == WATERMARK_ATTEMPTS - 1:
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")

    def _ask_watermarks(self) -> dict[int, tuple[int, int]]:
        found: dict[int, list[int]] = {}
        for kind in (OffsetSpec.earliest(), OffsetSpec.latest()):  # type: ignore[no-untyped-call]
            spec = {TopicPartition(self.topic, p): kind for p in self._partitions}
            futures = self._admin.list_offsets(
                spec,
                isolation_level=self._isolation,
                request_timeout=METADATA_TIMEOUT_S,
            )
            for tp, future in futures.items():
                found.setdefault(tp.partition, []).append(int(future.result().offset))
        return {p: (offsets[0], offsets[1]) for p, offsets in found.items()}

    def close(self) -> None:
        self._consumer.close()


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Verdict:
    scenario: str
    title: str
    accepted: int = 0
    final: int = 0
    lost: int = 0
    wrong: int = 0
    dup_sink: int = 0
    extra_events: int = 0
    flagged: int = 0
    unconfirmed: int = 0
    recover_s: float | None = None
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(c.ok for c in self.checks)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        lines = [f"scenario {self.scenario}: {self.title}: {'PASS' if self.ok else 'FAIL'}"]
        if self.error:
            lines.append(f"  error: {self.error}")
        lines += [f"  {'ok ' if c.ok else 'BAD'} {c.name}: {c.detail}" for c in self.checks]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class Join:
    """Per accepted pair: its final events, its flagged events, its arrivals."""

    finals: dict[Pair, list[DeliveryEvent]]
    flagged: set[Pair]
    arrivals: Counter[str]
    first_final_ts: dict[Pair, float]


def final_types(events: Iterable[DeliveryEvent]) -> dict[Pair, list[DeliveryEvent]]:
    finals: dict[Pair, list[DeliveryEvent]] = defaultdict(list)
    for event in events:
        if event.type in FINAL_EVENT_TYPES:
            finals[(event.message_id, event.recipient)].append(event)
    return finals


def arrivals_of(messages: Iterable[ReceivedMessage]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for message in messages:
        for rcpt in message.rcpt_tos:
            counts[rcpt.lower()] += 1
    return counts


def wait_final(
    reader: EventReader,
    pairs: set[Pair],
    timeout_s: float,
    *,
    also: Callable[[], bool] | None = None,
) -> bool:
    """Read events until every pair has a final state (and `also()` holds) or time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        reader.poll()
        finals = final_types(reader.events)
        if pairs <= set(finals) and (also is None or also()):
            # Let late duplicates of the same records show up before judging.
            reader.poll(1.0)
            return True
        if time.monotonic() >= deadline:
            return False


def judge(
    verdict: Verdict,
    pairs: set[Pair],
    events: Sequence[DeliveryEvent],
    sink_messages: Iterable[ReceivedMessage],
    *,
    fault_end: float | None = None,
    started: float | None = None,
    expect: Mapping[str, EventType] | None = None,
    delivered_must_arrive: bool = True,
) -> Join:
    """Fill the verdict's counts from the accepted pairs, the events and the sinks' messages.

    `expect` maps a recipient to the final state it must reach (default: delivered, unless
    ingest answered it suppressed). Adds the standard checks: nothing lost, no wrong state.
    """
    finals = final_types(events)
    arrivals = arrivals_of(sink_messages)
    by_recipient = {r.lower(): (m, r) for m, r in pairs}
    verdict.accepted = len(pairs)
    lost: list[str] = []
    wrong: list[str] = []
    first_ts: dict[Pair, float] = {}
    for pair in pairs:
        got = finals.get(pair, [])
        kinds = {e.type for e in got}
        if got:
            verdict.final += 1
            first_ts[pair] = min(e.ts.timestamp() for e in got)
            verdict.extra_events += len(got) - 1
        wanted = (expect or {}).get(pair[1])
        if not got:
            lost.append(f"{pair[1]}: no final state")
        elif len(kinds) > 1:
            wrong.append(f"{pair[1]}: {sorted(k.value for k in kinds)}")
        elif wanted is not None and kinds != {wanted}:
            wrong.append(f"{pair[1]}: {next(iter(kinds)).value}, wanted {wanted.value}")
        elif (
            delivered_must_arrive
            and EventType.DELIVERED in kinds
            and arrivals[pair[1].lower()] == 0
        ):
            lost.append(f"{pair[1]}: delivered but never arrived")
    flagged = {
        (e.message_id, e.recipient)
        for e in events
        if e.detail and "possible duplicate" in e.detail and (e.message_id, e.recipient) in pairs
    }
    verdict.flagged = len(flagged)
    verdict.dup_sink = sum(n - 1 for r, n in arrivals.items() if n > 1 and r in by_recipient)
    verdict.unconfirmed = sum(1 for r in arrivals if r not in by_recipient)
    verdict.lost = len(lost)
    verdict.wrong = len(wrong)
    if first_ts:
        last = max(first_ts.values())
        base = fault_end if fault_end is not None else started
        if base is not None:
            verdict.recover_s = max(0.0, last - base)
    verdict.check("nothing lost", not lost, f"{len(lost)} lost" + _sample(lost))
    verdict.check("one final state each", not wrong, f"{len(wrong)} wrong" + _sample(wrong))
    return Join(finals, flagged, arrivals, first_ts)


def _sample(items: Sequence[str], n: int = 5) -> str:
    return "" if not items else ": " + "; ".join(items[:n]) + (" …" if len(items) > n else "")
