"""Reads `mail.events` while the bench runs: which recipient reached which state, and when.

Bench recipients are named `b<phase>s<submission>r<index>@d<NN>.bench.example`, so every
event tells which phase and which submission it belongs to. The `delivered` event's `ts` is
the time the sender recorded the remote 250 (for a batch of several recipients: the end of
the batch's attempt, so an upper bound for all but its last recipient).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime

import orjson
from confluent_kafka import Consumer, TopicPartition

#: The contract's topic name (design.md); the services run without a topic prefix.
EVENTS = "mail.events"

log = logging.getLogger(__name__)

RECIPIENT = re.compile(r"^b(\d+)s(\d+)r(\d+)@")
CONSUME_BATCH = 2000
CONSUME_TIMEOUT_S = 0.2
SAMPLE_PROBLEMS = 5
#: States every recipient passes through on the way to `delivered`.
NORMAL = frozenset({"accepted", "queued"})


@dataclass
class PhaseEvents:
    types: Counter[str] = field(default_factory=Counter)
    #: (submission, index) -> epoch seconds of the `delivered` event
    delivered: dict[tuple[int, int], float] = field(default_factory=dict)
    duplicates: int = 0
    problems: list[str] = field(default_factory=list)


class EventCollector:
    def __init__(self, bootstrap: str) -> None:
        self._bootstrap = bootstrap
        self.phases: defaultdict[int, PhaseEvents] = defaultdict(PhaseEvents)
        self.foreign = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("could not start reading mail.events")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def delivered_count(self, phase: int) -> int:
        with self._lock:
            return len(self.phases[phase].delivered)

    def snapshot(self, phase: int) -> PhaseEvents:
        with self._lock:
            events = self.phases[phase]
            return PhaseEvents(
                Counter(events.types),
                dict(events.delivered),
                events.duplicates,
                list(events.problems),
            )

    def _run(self) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": self._bootstrap,
                "group.id": "bench-events",
                "enable.auto.commit": False,
                "log_level": 0,
            }
        )
        try:
            metadata = consumer.list_topics(EVENTS, timeout=30)
            partitions = []
            for number in metadata.topics[EVENTS].partitions:
                _, high = consumer.get_watermark_offsets(TopicPartition(EVENTS, number), timeout=30)
                partitions.append(TopicPartition(EVENTS, number, high))
            consumer.assign(partitions)
            self._ready.set()
            while not self._stop.is_set():
                for message in consumer.consume(CONSUME_BATCH, CONSUME_TIMEOUT_S):
                    if message.error() is None and (value := message.value()) is not None:
                        self._record(value)
        except Exception:
            log.exception("reading mail.events failed")
        finally:
            consumer.close()

    def _record(self, value: bytes) -> None:
        event = orjson.loads(value)
        match = RECIPIENT.match(event.get("recipient", ""))
        if match is None:
            self.foreign += 1
            return
        phase, submission, index = (int(g) for g in match.groups())
        kind = event.get("type", "?")
        with self._lock:
            events = self.phases[phase]
            events.types[kind] += 1
            if kind == "delivered":
                key = (submission, index)
                if key in events.delivered:
                    events.duplicates += 1
                else:
                    events.delivered[key] = datetime.fromisoformat(event["ts"]).timestamp()
            elif kind not in NORMAL and len(events.problems) < SAMPLE_PROBLEMS:
                smtp = event.get("smtp") or {}
                events.problems.append(
                    f"{kind}: {event['recipient']}: {smtp.get('code', '')} {smtp.get('text', '')}"
                    f" {event.get('detail') or ''}".strip()
                )
