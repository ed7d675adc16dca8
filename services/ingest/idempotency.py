"""Idempotency keys, remembered in the compacted `mail.idempotency` topic.

Protocol (the same for HTTP requests and `mail.submit` records):

1. Look the key up in the local view. Same body and `done`: replay the first answer and
   publish nothing. Different body: conflict (409). `pending` under a live lease held by
   someone else: wait for it, bounded.
2. Otherwise *claim* the key: write a `pending` record with a fresh claim id, and wait until
   this replica's view has applied that very record.
3. Every replica applies the records of a key in log order with the same rule (`apply`):
   a claim wins only if the key is free (unknown, released, outside its window, or held by a
   pending claim whose lease ran out by the broker's clock). So when two replicas claim at
   once, both read the same log and agree on one winner; the loser waits for the winner's
   answer like any later retry.
4. The winner writes `mail.accepted` (and the `accepted` events), then `done` with the
   answer; only then does it answer. If writing fails it writes `released`, so a retry may
   claim again.

Residual window, stated plainly: a winner that dies (or stalls past the lease, default 30 s)
after Kafka stored its `mail.accepted` but before its `done` is acknowledged can be taken over
by a retry, which then publishes the message a second time. Both copies carry the same message
id (a takeover inherits it), so downstream can tell them apart. Lease and window are judged by
the broker's LogAppendTime, so replica clock skew does not matter for who wins.

Memory: the view keeps a few small fields per key (not the answer: the answer is rebuilt
from the request, whose body hash must match), at most `max_keys` keys, each for the 24 h
window; past `max_keys` the least recently written keys are forgotten early.
"""

import asyncio
import hashlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from schemas.api import MessageRequest
from schemas.catalogue import IDEMPOTENCY, IDEMPOTENCY_WINDOW
from schemas.records import IdempotencyRecord, IdempotencyState, idempotency_key
from services.runtime.codec import encode
from services.runtime.follow import Follower
from services.runtime.producer import RecordProducer

log = logging.getLogger(__name__)

WAIT_POLL_S = 0.01
_REQUEST_FIELDS = set(MessageRequest.model_fields)


def body_digest(request: MessageRequest) -> str:
    """SHA-256 of the request as validated: the same message hashes the same however its
    JSON was spelled (key order, spacing, escapes), and `mail.submit`'s extra fields
    (tenant, key) do not count."""
    canonical = request.model_dump_json(by_alias=True, include=_REQUEST_FIELDS)
    return hashlib.sha256(canonical.encode()).hexdigest()


def keyed_message_id(tenant: str, key: str, now_s: float | None = None) -> str:
    """Time-sortable like every message id, with the rest derived from tenant and key."""
    millis = int((time.time() if now_s is None else now_s) * 1000)
    return f"{millis:012x}{hashlib.sha256(f'{tenant}/{key}'.encode()).hexdigest()[:20]}"


@dataclass(slots=True)
class Entry:
    state: IdempotencyState
    claim: str
    body_sha256: str
    message_id: str
    suppressed: tuple[int, ...]
    first_seen_s: float
    #: Broker time of the record that set this state.
    ts_s: float
    lease_s: float


class IdempotencyTable:
    """The view's state, and the one rule every replica applies (thread-safe)."""

    def __init__(self, max_keys: int, window_s: float = IDEMPOTENCY_WINDOW.total_seconds()):
        self._max_keys = max_keys
        self._window_s = window_s
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now_s: float) -> Entry | None:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or now_s - entry.first_seen_s >= self._window_s:
            return None
        return entry

    def apply(self, key: str, record: IdempotencyRecord | None, ts_s: float) -> None:
        """Apply one record of the log, at broker time `ts_s`."""
        with self._lock:
            current = self._entries.get(key)
            if current is not None and ts_s - current.first_seen_s >= self._window_s:
                current = None
            if record is None:
                self._entries.pop(key, None)
                return
            if not self._wins(current, record, ts_s):
                return
            self._entries[key] = Entry(
                state=record.state,
                claim=record.claim,
                body_sha256=record.body_sha256,
                message_id=record.message_id,
                suppressed=tuple(record.suppressed),
                first_seen_s=current.first_seen_s
                if current is not None
                else record.first_seen.timestamp(),
                ts_s=ts_s,
                lease_s=record.lease_s,
            )
            self._entries.move_to_end(key)
            self._evict(ts_s)

    @staticmethod
    def _wins(current: Entry | None, record: IdempotencyRecord, ts_s: float) -> bool:
        if current is None or current.claim == record.claim:
            return True
        if record.state is not IdempotencyState.PENDING:
            return False  # only a claim's owner settles it
        if current.state is IdempotencyState.RELEASED:
            return True
        return current.state is IdempotencyState.PENDING and ts_s >= current.ts_s + current.lease_s

    def _evict(self, now_s: float) -> None:
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if (
                len(self._entries) <= self._max_keys
                and now_s - oldest.first_seen_s < self._window_s
            ):
                return
            self._entries.popitem(last=False)


@dataclass(frozen=True)
class Replay:
    """The key is done: answer as the first time."""

    message_id: str
    suppressed: tuple[int, ...]


@dataclass(frozen=True)
class Conflict:
    """The key was used with another body."""


@dataclass(frozen=True)
class InProgress:
    """Another request holds the key and has not finished within our wait."""

    retry_after_s: float


@dataclass(frozen=True)
class Claimed:
    """This request owns the key: publish under `message_id`, then `finish` or `release`."""

    tenant: str
    key: str
    claim: str
    body_sha256: str
    message_id: str
    first_seen: datetime


Decision = Replay | Conflict | InProgress | Claimed


class ClaimFailed(Exception):
    """The claim could not be written or read back in time (Kafka unavailable)."""


class IdempotencyGuard:
    def __init__(
        self,
        kafka_config: dict[str, Any],
        producer: RecordProducer,
        *,
        lease_s: float,
        max_keys: int,
        topic: str = IDEMPOTENCY,
    ) -> None:
        self.table = IdempotencyTable(max_keys)
        self._producer = producer
        self._lease_s = lease_s
        self._topic = topic
        self._follower = Follower(kafka_config, topic, self._on_record)

    def start(self) -> None:
        self._follower.start()

    def stop(self) -> None:
        self._follower.stop()

    @property
    def ready(self) -> bool:
        return self._follower.ready

    def _on_record(
        self, _partition: int, _offset: int, key: bytes | None, value: bytes | None, ts_ms: int
    ) -> None:
        if key is None:
            return
        record = None
        if value is not None:
            try:
                record = IdempotencyRecord.model_validate_json(value)
            except ValidationError:
                log.warning(
                    "unreadable idempotency record", extra={"key": key.decode(errors="replace")}
                )
                return
        self.table.apply(key.decode(errors="replace"), record, ts_ms / 1000)

    async def begin(
        self, tenant: str, key: str, digest: str, wait_s: float, timeout_s: float
    ) -> Decision:
        """Decide what a request carrying `key` does; claims the key when it is free.

        Waits up to `wait_s` for another holder to finish; raises ClaimFailed when the
        claim cannot be stored and read back within `timeout_s`.
        """
        name = idempotency_key(tenant, key)
        deadline = time.monotonic() + wait_s
        while True:
            now_s = time.time()
            entry = self.table.get(name, now_s)
            if entry is not None and entry.body_sha256 != digest:
                return Conflict()
            if entry is not None and entry.state is IdempotencyState.DONE:
                return Replay(entry.message_id, entry.suppressed)
            held = (
                entry is not None
                and entry.state is IdempotencyState.PENDING
                and now_s < entry.ts_s + entry.lease_s
            )
            if held:
                assert entry is not None
                if time.monotonic() >= deadline:
                    return InProgress(max(1.0, entry.ts_s + entry.lease_s - now_s))
                await asyncio.sleep(WAIT_POLL_S)
                continue
            claimed = await self._claim(tenant, key, digest, entry, timeout_s)
            if claimed is not None:
                return claimed
            # Another replica's claim came first in the log: loop to wait for its answer.

    async def _claim(
        self, tenant: str, key: str, digest: str, previous: Entry | None, timeout_s: float
    ) -> Claimed | None:
        name = idempotency_key(tenant, key)
        now = datetime.now(UTC)
        claim = Claimed(
            tenant=tenant,
            key=key,
            claim=uuid.uuid4().hex,
            body_sha256=digest,
            message_id=previous.message_id
            if previous is not None
            else keyed_message_id(tenant, key, now.timestamp()),
            first_seen=datetime.fromtimestamp(previous.first_seen_s, UTC)
            if previous is not None
            else now,
        )
        try:
            async with asyncio.timeout(timeout_s):
                stored = await self._producer.send(
                    self._topic, self._record(claim, IdempotencyState.PENDING), name
                )
                await self._follower.wait_applied(
                    int(stored.partition() or 0), int(stored.offset() or 0), timeout_s
                )
        except Exception as exc:
            raise ClaimFailed(str(exc) or type(exc).__name__) from exc
        entry = self.table.get(name, time.time())
        return claim if entry is not None and entry.claim == claim.claim else None

    def _record(
        self, claim: Claimed, state: IdempotencyState, suppressed: list[int] | None = None
    ) -> bytes:
        return encode(
            IdempotencyRecord(
                tenant=claim.tenant,
                key=claim.key,
                state=state,
                claim=claim.claim,
                body_sha256=claim.body_sha256,
                message_id=claim.message_id,
                suppressed=suppressed or [],
                first_seen=claim.first_seen,
                lease_s=self._lease_s,
            )
        )

    async def finish(self, claim: Claimed, suppressed: list[int]) -> None:
        """Store the answer; raises the producer's error if Kafka does not acknowledge it."""
        name = idempotency_key(claim.tenant, claim.key)
        await self._producer.send(
            self._topic, self._record(claim, IdempotencyState.DONE, suppressed), name
        )

    async def release(self, claim: Claimed, timeout_s: float) -> None:
        """Best effort: free the key after a failure (else the lease frees it)."""
        name = idempotency_key(claim.tenant, claim.key)
        try:
            async with asyncio.timeout(timeout_s):
                await self._producer.send(
                    self._topic, self._record(claim, IdempotencyState.RELEASED), name
                )
        except Exception as exc:
            log.warning("could not release idempotency key", extra={"error": str(exc)})
