"""The message status view: each recipient's timeline, built from `mail.events`.

Every replica follows `mail.events` (keyed by message id, so one message's events are in one
partition, in order) from `window_s` ago, and so answers correctly after a restart: nothing
lives only in a process. Each event is kept as the bytes Kafka delivered and parsed only when
someone asks, so following is cheap.

Memory is bounded twice: messages whose first event is older than `window_s` are dropped,
and past `max_events` events the least recently updated messages are dropped first. A
dropped (or never seen) message answers 404; the full history stays in Kafka for the
topic's retention (30 days).

The view is eventually consistent: an event is visible here milliseconds after Kafka stored
it, on every replica.
"""

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from schemas.api import MessageStatus, RecipientTimeline, SmtpAnswer, TimelineEvent
from schemas.catalogue import EVENTS
from schemas.records import FINAL_EVENT_TYPES, DeliveryEvent, EventType
from services.runtime.follow import Follower

log = logging.getLogger(__name__)

#: Events about reports that matched no message carry no timeline.
_NOT_IN_TIMELINE = frozenset({EventType.UNMATCHED, EventType.UNPARSED})


@dataclass(slots=True)
class _Message:
    first_seen_s: float
    events: list[bytes] = field(default_factory=list)


class StatusView:
    def __init__(
        self,
        kafka_config: dict[str, Any],
        window_s: float,
        max_events: int,
        topic: str = EVENTS,
    ) -> None:
        self._window_s = window_s
        self._max_events = max_events
        self._messages: OrderedDict[str, _Message] = OrderedDict()
        self._events = 0
        self._lock = threading.Lock()
        since_ms = int((time.time() - window_s) * 1000)
        self._follower = Follower(kafka_config, topic, self._on_record, since_ms=since_ms)

    def start(self) -> None:
        self._follower.start()

    def stop(self) -> None:
        self._follower.stop()

    @property
    def ready(self) -> bool:
        return self._follower.ready

    def wait_ready(self, timeout_s: float) -> bool:
        return self._follower.wait_ready(timeout_s)

    @property
    def event_count(self) -> int:
        return self._events

    def __len__(self) -> int:
        return len(self._messages)

    def _on_record(
        self, _partition: int, _offset: int, key: bytes | None, value: bytes | None, ts_ms: int
    ) -> None:
        if not key or value is None:
            return
        self.add(key.decode(errors="replace"), value, ts_ms / 1000)

    def add(self, message_id: str, event: bytes, ts_s: float) -> None:
        """Record one event (raw `DeliveryEvent` JSON) of a message."""
        with self._lock:
            message = self._messages.get(message_id)
            if message is None:
                message = self._messages[message_id] = _Message(ts_s)
            else:
                self._messages.move_to_end(message_id)
            message.events.append(event)
            self._events += 1
            self._evict(ts_s)

    def _evict(self, now_s: float) -> None:
        while self._messages:
            oldest_id, oldest = next(iter(self._messages.items()))
            if self._events <= self._max_events and now_s - oldest.first_seen_s < self._window_s:
                return
            del self._messages[oldest_id]
            self._events -= len(oldest.events)

    def get(self, message_id: str) -> tuple[str, MessageStatus] | None:
        """(tenant, status) of a message, or None if it is not in the view."""
        with self._lock:
            message = self._messages.get(message_id)
            raw = list(message.events) if message is not None else []
        events = []
        for value in raw:
            try:
                events.append(DeliveryEvent.model_validate_json(value))
            except ValidationError:
                log.warning("unreadable event", extra={"message_id": message_id})
        events = [e for e in events if e.type not in _NOT_IN_TIMELINE and e.tenant]
        if not events:
            return None
        return events[0].tenant, timeline(message_id, events)


def timeline(message_id: str, events: list[DeliveryEvent]) -> MessageStatus:
    """Group a message's events (in log order) into each recipient's state and timeline."""
    by_recipient: dict[str, list[DeliveryEvent]] = {}
    for event in events:
        by_recipient.setdefault(event.recipient, []).append(event)
    recipients = []
    for email, own in by_recipient.items():
        final = next((e.type.value for e in own if e.type in FINAL_EVENT_TYPES), None)
        recipients.append(
            RecipientTimeline.model_validate(
                {
                    "email": email,
                    "state": own[-1].type.value,
                    "final": final,
                    "events": [_timeline_event(e) for e in own],
                }
            )
        )
    accepted = [e.ts for e in events if e.type is EventType.ACCEPTED]
    return MessageStatus(
        id=message_id, accepted_at=min(accepted) if accepted else None, recipients=recipients
    )


def _timeline_event(event: DeliveryEvent) -> TimelineEvent:
    return TimelineEvent.model_validate(
        {
            "type": event.type.value,
            "ts": event.ts,
            "attempt": event.attempt,
            "mx": event.mx,
            "smtp": None
            if event.smtp is None
            else SmtpAnswer(
                code=event.smtp.code, enhanced=event.smtp.enhanced, text=event.smtp.text
            ),
            "category": None if event.category is None else str(event.category),
            "hard": event.hard,
            "detail": event.detail,
        }
    )
