"""The message status view: each recipient's timeline, built from `mail.events`.

Every replica follows `mail.events` (keyed by message id, so one message's events are in one
partition, in order) from `window_s` ago, and so answers correctly after a restart: nothing
lives only in a process. Events are stored on disk as the bytes Kafka delivered
(`status_store.py`: SQLite, so resident memory does not grow with the history) and parsed
only when someone asks. With `MAILRAIL_STATE_DIR` the file outlives the process and a restart
reads on from where it stopped; without it, every start rebuilds the view from the topic.

Bounds: messages whose first event is older than `window_s` are dropped, and past
`max_events` events the oldest messages go first. A dropped (or never seen) message answers
404; the full history stays in Kafka for the topic's retention (30 days).

The view is eventually consistent: an event is visible here milliseconds after Kafka stored
it, on every replica.
"""

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from schemas.api import MessageStatus, RecipientTimeline, SmtpAnswer, TimelineEvent
from schemas.catalogue import EVENTS
from schemas.records import FINAL_EVENT_TYPES, DeliveryEvent, EventType
from services.ingest.status_store import StatusStore
from services.runtime.follow import Follower

log = logging.getLogger(__name__)

#: Events about reports that matched no message carry no timeline.
_NOT_IN_TIMELINE = frozenset({EventType.UNMATCHED, EventType.UNPARSED})
STATUS_FILE = "status.sqlite3"


class StatusView:
    def __init__(
        self,
        kafka_config: dict[str, Any],
        window_s: float,
        max_events: int,
        state_dir: Path | None = None,
        topic: str = EVENTS,
    ) -> None:
        """`state_dir`: where the status file lives and is kept across restarts; without
        one, a temporary folder removed at `stop()` (the view is rebuilt at every start)."""
        self._temporary = None if state_dir is not None else tempfile.mkdtemp("-mailrail-status")
        folder = state_dir if state_dir is not None else Path(self._temporary or ".")
        self._store = StatusStore(folder / STATUS_FILE, window_s, max_events)
        since_ms = int((time.time() - window_s) * 1000)
        self._follower = Follower(
            kafka_config,
            topic,
            self._on_record,
            since_ms=since_ms,
            positions=self._store.positions(),
            on_batch=self._store.flush,
            on_stale=self._store.reset,
        )

    def start(self) -> None:
        self._follower.start()

    def stop(self) -> None:
        self._follower.stop()
        self._store.close()
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)

    @property
    def ready(self) -> bool:
        return self._follower.ready

    def wait_ready(self, timeout_s: float) -> bool:
        return self._follower.wait_ready(timeout_s)

    @property
    def event_count(self) -> int:
        return self._store.event_count

    def _on_record(
        self, partition: int, offset: int, key: bytes | None, value: bytes | None, ts_ms: int
    ) -> None:
        if not key or value is None:
            return
        self._store.add(partition, offset, key.decode(errors="replace"), value, ts_ms / 1000)

    def get(self, message_id: str) -> tuple[str, MessageStatus] | None:
        """(tenant, status) of a message, or None if it is not in the view."""
        raw = self._store.events(message_id)
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
