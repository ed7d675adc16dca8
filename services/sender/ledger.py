"""The delivery ledger: recipients a receiving server already answered 2xx for.

A sender commits a record's offset only after the record's events are written. One that dies
between a remote 250 and that commit leaves the record to be read again — by its restart or
by another member of the pool — and the recipients it had delivered would be sent twice.
So, right after each 2xx, the sender writes `pool/message id/recipient index` to `mail.ledger`;
every sender reads the newest `max_entries` of those records back at start (before it takes
work) and then follows the topic, into a table of digests of fixed size (`digests.py`); its
own writes go into the table at once. A batch's recipients found there are not sent again:
their `delivered` event is written again, marked as coming from the ledger. Two copies of a
batch can meet in one sender (one held to a delay topic, its record read again after a
restart): a copy of recipients being sent waits for that send to end (`claim`, `release`).

Ordering: ledger writes go out at once (their own producer, no linger) but are not awaited
one by one (the next recipient goes out meanwhile); a batch's outputs, and so its commit,
wait for its ledger writes (`settle`). A record is read
again by another member only after this one's session expired, long after its acknowledged
ledger writes reached every follower; a restarted member loads them before it consumes.

What is left, and measured (chaos scenario 4): a crash between a 250 and the acknowledgement
of its ledger write sends that recipient again; so do two copies sent at the same moment by
two members. A ledger write that fails is logged and
counted, never fatal: the mail was delivered, failing the batch would send it again.

`MAILRAIL_TEST_CRASH_AFTER_250` is a test hook (chaos scenario 4): `N` (an integer) ends the
process on its N-th remote 2xx, `p` (below 1) after each 2xx with probability p; with
`MAILRAIL_TEST_CRASH_POINT=after-ledger` the process ends once that recipient's ledger write
is acknowledged, otherwise (`before-ledger`) before it is written. Never set it in production.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.catalogue import LEDGER
from schemas.records import (
    BatchRecipient,
    DeliveryBatch,
    LedgerEntry,
    SmtpReply,
    ledger_key,
)
from services.runtime.follow import Follower, by_key
from services.runtime.producer import AsyncProducer
from services.runtime.telemetry_metrics import counter
from services.sender.digests import DigestRing

log = logging.getLogger(__name__)

#: Ledger writes remembered until their batch settles, before finished ones are dropped.
MAX_PENDING = 100_000
#: The exit status of the crash hook (EX_SOFTWARE).
CRASH_EXIT_STATUS = 70
#: The reply a recipient found in the ledger is reported with.
LEDGER_REPLY = SmtpReply(
    code=250, enhanced="2.0.0", text="delivered before a restart (delivery ledger): not sent again"
)

HITS = counter(
    "mailrail_ledger_hits_total", "Recipients not sent again: the ledger knew them", ["pool"]
)
WRITE_FAILURES = counter(
    "mailrail_ledger_write_failures_total", "Ledger writes Kafka did not acknowledge", ["pool"]
)


class LedgerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAILRAIL_", frozen=True, extra="ignore")

    #: Off: no ledger writes, no look-ups (a crash before the commit then sends twice).
    ledger: bool = True
    #: The newest entries a sender keeps (and reads back at start); 37 bytes each, taken at
    #: start (18 MiB for the default).
    ledger_max_entries: int = 500_000
    test_crash_after_250: str | None = None
    test_crash_point: Literal["before-ledger", "after-ledger"] = "before-ledger"


class _CrashHook:
    """Ends the process on the n-th 2xx, or after each with a probability (tests only)."""

    def __init__(self, spec: str, point: str) -> None:
        value = float(spec)
        self.count = int(value) if value >= 1 else None
        self.probability = value if value < 1 else None
        self.point = point
        self.seen = 0

    def due(self) -> bool:
        self.seen += 1
        if self.count is not None:
            return self.seen >= self.count
        return random.random() < (self.probability or 0.0)

    def crash(self, key: str, unacked: list[str]) -> None:
        """Exit now, naming the ledger writes not yet acknowledged (they may be lost)."""
        sys.stderr.write(
            f"MAILRAIL-TEST-CRASH point={self.point} key={key} unacked={len(unacked)} "
            f"unacked_keys={','.join(unacked)} after={self.seen} at={time.time():.6f}\n"
        )
        sys.stderr.flush()
        os._exit(CRASH_EXIT_STATUS)


class DeliveryLedger:
    """Construct inside the event loop (it owns a producer); `start()`, `wait_ready()`."""

    def __init__(
        self,
        kafka_config: dict[str, Any],
        producer_config: dict[str, Any],
        pool: str,
        settings: LedgerSettings | None = None,
        topic: str = LEDGER,
    ) -> None:
        self.settings = settings or LedgerSettings()
        self._pool = pool
        # Its own producer, sending at once (no linger): a ledger write leaves the process
        # within the next transaction, so a crash loses as few of them as it can.
        self._producer = AsyncProducer(producer_config | {"linger.ms": 0})
        self._topic = topic
        self._keys = DigestRing(self.settings.ledger_max_entries)
        self._prefix = f"{pool}/"
        self._pending: dict[str, asyncio.Future[Any]] = {}
        #: Recipients this process is sending now, each to the event set when that ends.
        self._sending: dict[str, asyncio.Event] = {}
        hook = self.settings.test_crash_after_250
        self._hook = _CrashHook(hook, self.settings.test_crash_point) if hook else None
        self._view = Follower(
            kafka_config,
            topic,
            by_key(self._on_record),
            tail_records=self.settings.ledger_max_entries,
        )

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self.settings.ledger:
            self._view.start()

    def stop(self) -> None:
        self._view.stop()
        self._producer.close()

    @property
    def ready(self) -> bool:
        return not self.settings.ledger or self._view.ready

    def wait_ready(self, timeout_s: float) -> bool:
        """True once loaded; False on timeout (the log says what it waits for)."""
        return not self.settings.ledger or self._view.wait_ready(timeout_s)

    def __len__(self) -> int:
        return len(self._keys)

    # -- the sender's calls -----------------------------------------------------------------

    async def claim(
        self, batch: DeliveryBatch
    ) -> tuple[list[BatchRecipient], DeliveryBatch | None]:
        """(recipients already delivered, the batch of the others or None if none is left).

        A copy of recipients this process is sending right now waits for that send to end
        first, then is checked against the ledger; the others are claimed until `release`.
        """
        if not self.settings.ledger:
            return [], batch
        keys = [ledger_key(self._pool, batch.message_id, r.index) for r in batch.recipients]
        while busy := {event for key in keys if (event := self._sending.get(key)) is not None}:
            for event in busy:
                await event.wait()
        known: list[BatchRecipient] = []
        rest: list[BatchRecipient] = []
        claimed = asyncio.Event()
        for recipient, key in zip(batch.recipients, keys, strict=True):
            if key in self._keys:
                known.append(recipient)
            else:
                rest.append(recipient)
                self._sending[key] = claimed
        if not known:
            return [], batch
        HITS.labels(self._pool).inc(len(known))
        log.info(
            "recipients already delivered (ledger): not sent again",
            extra={"message_id": batch.message_id, "recipients": len(known)},
        )
        return known, (batch.model_copy(update={"recipients": rest}) if rest else None)

    def release(self, batch: DeliveryBatch) -> None:
        """End the claim of `claim`'s batch (delivered, deferred, held or failed)."""
        for r in batch.recipients:
            event = self._sending.pop(ledger_key(self._pool, batch.message_id, r.index), None)
            if event is not None:
                event.set()

    async def record(
        self, batch: DeliveryBatch, results: Sequence[tuple[BatchRecipient, SmtpReply]]
    ) -> None:
        """Right after a transaction: ledger every recipient the server accepted (2xx)."""
        for recipient, reply in results:
            if reply.code >= 400:
                continue
            key = ledger_key(self._pool, batch.message_id, recipient.index)
            crash = self._hook is not None and self._hook.due()
            if (
                crash
                and self._hook is not None
                and (self._hook.point == "before-ledger" or not self.settings.ledger)
            ):
                self._hook.crash(key, self._unacked())
            if not self.settings.ledger:
                continue
            # This process knows at once; the topic tells the others (and a restart). A copy
            # of the batch can come back here sooner than the write is read back: a batch held
            # to a delay topic whose record is read again after a restart.
            self._keys.add(key)
            entry = LedgerEntry(message_id=batch.message_id, index=recipient.index, pool=self._pool)
            future = self._producer.send(
                self._topic, entry.model_dump_json().encode(), key.encode()
            )
            self._pending[key] = future
            if len(self._pending) > MAX_PENDING:
                # Batches cancelled on revoke never settle: forget their finished writes.
                self._pending = {k: f for k, f in self._pending.items() if not f.done()}
            if crash and self._hook is not None:
                await asyncio.wait([future])
                self._hook.crash(key, self._unacked())

    async def settle(self, batch: DeliveryBatch) -> None:
        """Wait for the batch's ledger writes; a failed one is logged, never raised."""
        futures = [
            (key, future)
            for r in batch.recipients
            if (
                future := self._pending.pop(
                    key := ledger_key(self._pool, batch.message_id, r.index), None
                )
            )
            is not None
        ]
        if not futures:
            return
        await asyncio.wait([f for _, f in futures])
        for key, future in futures:
            if future.exception() is not None:
                WRITE_FAILURES.labels(self._pool).inc()
                log.warning(
                    "ledger write failed: a crash before the commit would send again",
                    extra={"key": key, "error": str(future.exception())},
                )

    def _unacked(self) -> list[str]:
        return [key for key, future in self._pending.items() if not future.done()]

    # -- the view -----------------------------------------------------------------------------

    def _on_record(self, key: str, value: bytes | None) -> None:
        if value is not None and key.startswith(self._prefix):
            self._keys.add(key)
