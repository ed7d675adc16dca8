"""Operator controls from the compacted `mail.control` topic, as senders and router obey them.

A scope is `kind:value` parts joined by `@`, e.g. `domain:gmail.com@pool:marketing`; a
command applies to a batch when every part it names matches. Kinds: `domain` (the recipient
domain or the throttle key), `provider` (the throttle key), `pool`, `tenant`. Parts of other
kinds (such as `dnsbl:zone`, or `control:quota` in the key of a command other than a pause)
label the command and do not narrow it. Actions: PAUSE (hold the batches), QUOTA (a rate
override), MOVE (re-publish to `to_pool`), PURGE (bounce batches accepted before the command).
"""

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from schemas.catalogue import CONTROL
from schemas.records import ControlAction, ControlCommand, DeliveryBatch, utc_now
from services.runtime.follow import Follower, by_key

log = logging.getLogger(__name__)


def parse_scope(scope: str) -> dict[str, str]:
    parts: dict[str, str] = {}
    for part in scope.split("@"):
        kind, sep, value = part.partition(":")
        if sep:
            parts[kind.strip().lower()] = value.strip().lower()
    return parts


def scope_matches(parts: dict[str, str], batch: DeliveryBatch) -> bool:
    for kind, value in parts.items():
        if kind == "domain" and value not in (batch.domain, batch.throttle_key):
            return False
        if kind == "provider" and value != batch.throttle_key:
            return False
        if kind == "pool" and value != batch.pool:
            return False
        if kind == "tenant" and value != batch.tenant:
            return False
    return True


def scope_for(batch: DeliveryBatch) -> str:
    return f"domain:{batch.throttle_key}@pool:{batch.pool}"


class Controls:
    """The commands in force; reads are lock-free snapshots, updated by the reader thread."""

    def __init__(self) -> None:
        self._commands: dict[str, tuple[dict[str, str], ControlCommand]] = {}
        self._lock = threading.Lock()
        self._updates: dict[str, int] = {}

    def updates(self, scope: str) -> int:
        """How many records for this scope have been read (to tell when one echoes back)."""
        return self._updates.get(scope, 0)

    def apply(self, scope: str, command: ControlCommand | None) -> None:
        with self._lock:
            self._updates[scope] = self._updates.get(scope, 0) + 1
            commands = dict(self._commands)
            if command is None:
                commands.pop(scope, None)
            else:
                commands[scope] = (parse_scope(command.scope), command)
            self._commands = commands

    def _active(
        self, batch: DeliveryBatch, action: ControlAction, now: datetime
    ) -> list[ControlCommand]:
        return [
            command
            for parts, command in self._commands.values()
            if command.action is action
            and (command.expires_at is None or command.expires_at > now)
            and scope_matches(parts, batch)
        ]

    def in_force(
        self, action: ControlAction, now: datetime | None = None
    ) -> list[tuple[dict[str, str], ControlCommand]]:
        """Every unexpired command of this action, with its parsed scope."""
        now = now or utc_now()
        return [
            (parts, command)
            for parts, command in self._commands.values()
            if command.action is action and (command.expires_at is None or command.expires_at > now)
        ]

    def moved_to(self, batch: DeliveryBatch, now: datetime | None = None) -> str | None:
        """The pool a MOVE in force sends this batch to (the newest command wins)."""
        moves = [
            c
            for c in self._active(batch, ControlAction.MOVE, now or utc_now())
            if c.to_pool and c.to_pool != batch.pool
        ]
        return max(moves, key=lambda c: c.created_at).to_pool if moves else None

    def purge(self, batch: DeliveryBatch, now: datetime | None = None) -> ControlCommand | None:
        """A PURGE in force that covers this batch: one written after it was accepted."""
        purges = [
            c
            for c in self._active(batch, ControlAction.PURGE, now or utc_now())
            if batch.accepted_at <= c.created_at
        ]
        return purges[0] if purges else None

    def still_held(self, batch: DeliveryBatch, now: datetime | None = None) -> bool:
        """Whether a batch held for a pause must stay held: a pause is still in force and no
        MOVE or PURGE has taken it over (the sender acts on those at once)."""
        now = now or utc_now()
        return (
            self.paused_until(batch, now) is not None
            and self.purge(batch, now) is None
            and self.moved_to(batch, now) is None
        )

    def paused_until(self, batch: DeliveryBatch, now: datetime | None = None) -> datetime | None:
        """When the latest pause in force for this batch ends (`datetime.max` if never)."""
        now = now or utc_now()
        pauses = self._active(batch, ControlAction.PAUSE, now)
        if not pauses:
            return None
        return max(p.expires_at or datetime.max.replace(tzinfo=now.tzinfo) for p in pauses)

    def quota(self, batch: DeliveryBatch, now: datetime | None = None) -> float | None:
        """The lowest quota override in force (messages per second), if any."""
        rates = [
            c.messages_per_s for c in self._active(batch, ControlAction.QUOTA, now or utc_now())
        ]
        known = [r for r in rates if r is not None]
        return min(known) if known else None


class ControlView:
    def __init__(self, kafka_config: dict[str, Any]) -> None:
        self.controls = Controls()
        #: Called on the reader's thread after every record applied (set before `start`).
        self.on_change: Callable[[], object] | None = None
        self._reader = Follower(kafka_config, CONTROL, by_key(self._on_record))

    def _on_record(self, key: str, value: bytes | None) -> None:
        self._apply(key, value)
        if self.on_change is not None:
            self.on_change()

    def _apply(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.controls.apply(key, None)
            return
        try:
            command = ControlCommand.model_validate_json(value)
        except ValidationError:
            log.warning("unreadable control record", extra={"key": key})
            return
        self.controls.apply(key, command)
        log.info("control", extra={"scope": command.scope, "action": command.action.value})

    def start(self) -> None:
        self._reader.start()

    def stop(self) -> None:
        self._reader.stop()

    @property
    def ready(self) -> bool:
        return self._reader.ready

    def wait_ready(self, timeout_s: float) -> bool:
        return self._reader.wait_ready(timeout_s)
