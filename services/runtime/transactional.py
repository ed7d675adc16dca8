"""A transactional producer with group commit: what is answered "stored" is committed.

Why: an idempotent producer whose records time out while a request to a failed leader is
in flight must bump its epoch, and librdkafka then resends the other partitions' possibly
stored batches under the new epoch, where the broker cannot recognise them: byte-identical
twin records (confluentinc/librdkafka#4953). A service that must answer within seconds
(ingest: 503 after `MAILRAIL_PRODUCE_TIMEOUT_S`) cannot wait out a leader election, so it
writes in transactions instead: a transaction either commits whole or is aborted, and an
aborted record is invisible to every `read_committed` reader (librdkafka's default, and
every Mailrail consumer's).

How: `send()` / `send_all()` queue their records; one thread owns the librdkafka producer
and, while records wait, runs `begin → produce all waiting → commit`. Records that arrive
during a commit go into the next one, so under load a transaction carries many requests
and costs one commit. A future resolves only when its transaction committed, and fails
(`DeliveryFailed`) when it was aborted, or when its records waited `admission_s` without a
transaction to join (never written). The one uncertain case is a commit whose outcome
never arrived (the coordinator lost mid-commit): the future fails, marked `uncertain`.

Restarts: the `transactional.id` is stable per replica, so a restarted process fences its
predecessor and aborts what it left open (`init_transactions`) rather than making
`read_committed` readers wait out `transaction.timeout.ms`.
"""

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from services.runtime.producer import DeliveryFailed, Headers, Record, produce_waiting, traced

log = logging.getLogger(__name__)

#: librdkafka ties every record's delivery timeout to the transaction's: not set separately.
_PER_RECORD_TIMEOUTS = ("delivery.timeout.ms", "message.timeout.ms")
INIT_RETRY_S = 0.5


@dataclass
class _Submission:
    records: Sequence[Record]
    future: "asyncio.Future[list[Message]]"
    queued_at: float = field(default_factory=time.monotonic)
    messages: list[Message | None] = field(default_factory=list)


class TransactionalProducer:
    def __init__(
        self,
        config: dict[str, Any],
        transactional_id: str,
        *,
        admission_s: float,
        transaction_timeout_s: float = 10.0,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._config = {k: v for k, v in config.items() if k not in _PER_RECORD_TIMEOUTS} | {
            "transactional.id": transactional_id,
            "transaction.timeout.ms": int(transaction_timeout_s * 1000),
        }
        self._admission_s = admission_s
        #: The longest a send can take to settle: waiting for a transaction, then its commit.
        self.settle_s = admission_s + transaction_timeout_s
        self._loop = loop or asyncio.get_running_loop()
        self._queue: deque[_Submission] = deque()
        self._wake = threading.Condition()
        self._busy = False
        self._closing = False
        self.transactions = 0
        self._thread = threading.Thread(target=self._run, name="producer-txn", daemon=True)
        self._thread.start()

    # -- the event loop's side ------------------------------------------------------------

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | str | None = None,
        headers: Headers | None = None,
    ) -> "asyncio.Future[Message]":
        """Queue one record; the future resolves when its transaction has committed."""
        result: asyncio.Future[Message] = self._loop.create_future()
        batch = self._submit([(topic, value, key, headers)])

        def unwrap(done: "asyncio.Future[list[Message]]") -> None:
            if result.done():
                return
            if done.cancelled():
                result.cancel()
            elif (error := done.exception()) is not None:
                result.set_exception(error)
            else:
                result.set_result(done.result()[0])

        batch.add_done_callback(unwrap)
        return result

    async def send_all(self, records: Sequence[Record]) -> None:
        """Send records and wait until the transaction holding them all has committed."""
        if records:
            await self._submit(records)

    def _submit(self, records: Sequence[Record]) -> "asyncio.Future[list[Message]]":
        future: asyncio.Future[list[Message]] = self._loop.create_future()
        with self._wake:
            if self._closing:
                future.set_exception(
                    DeliveryFailed(KafkaError(KafkaError._STATE, "producer closed"))
                )
                return future
            self._queue.append(_Submission([traced(r) for r in records], future))
            self._wake.notify()
        return future

    def flush(self, timeout_s: float) -> int:
        """Wait until nothing is queued or being committed; returns the submissions left."""
        deadline = time.monotonic() + timeout_s
        with self._wake:
            while (self._queue or self._busy) and time.monotonic() < deadline:
                self._wake.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            return len(self._queue) + int(self._busy)

    def close(self, timeout_s: float = 10.0) -> None:
        remaining = self.flush(timeout_s)
        if remaining:
            log.warning("producer closed with %d submissions not committed", remaining)
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._thread.join(timeout=self.settle_s + 2)

    # -- the producer thread ----------------------------------------------------------------

    def _run(self) -> None:
        """Initialise (at once, not at the first record), then one transaction after another
        while records wait; a failed producer is replaced."""
        producer: Producer | None = None
        ready = False
        while True:
            if producer is None:
                producer = Producer(self._config)
                ready = False
            if not ready:
                error = self._initialise(producer)
                if error is not None:
                    if error.fatal():
                        producer = None
                    self._expire_queued()
                    if self._closing:
                        break
                    time.sleep(INIT_RETRY_S)
                    continue
                ready = True
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait(0.1)
                if not self._queue and self._closing:
                    break
                batch = list(self._queue)
                self._queue.clear()
                self._busy = True
            try:
                producer = self._transact(producer, batch)
            finally:
                with self._wake:
                    self._busy = False
                    self._wake.notify_all()
        self._fail_queued(KafkaError(KafkaError._STATE, "producer closed"))

    def _initialise(self, producer: Producer) -> KafkaError | None:
        """Initialise transactions (this fences an earlier instance with the same id and
        aborts what it left open). The error, while Kafka cannot be reached yet or is still
        busy with that earlier instance: init is then asked again, on the same producer
        unless the error is fatal."""
        try:
            # Briefly, so that records waiting too long are failed on time meanwhile.
            producer.init_transactions(INIT_RETRY_S)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            log.warning("transactions not initialised yet", extra={"error": str(error)})
            return error
        return None

    def _admissible(self, submissions: list[_Submission]) -> list[_Submission]:
        """The submissions still to write. One cancelled while queued is dropped; one that
        waited longer than `admission_s` for a transaction fails: neither is ever written."""
        now = time.monotonic()
        live = []
        for submission in submissions:
            if submission.future.done():
                continue
            if now - submission.queued_at > self._admission_s:
                self._settle(submission, _waited_too_long())
                continue
            live.append(submission)
        return live

    def _expire_queued(self) -> None:
        """While no transaction can start: fail what waited too long, keep the rest queued."""
        with self._wake:
            waiting = list(self._queue)
            self._queue.clear()
        live = self._admissible(waiting)
        with self._wake:
            self._queue.extendleft(reversed(live))

    def _transact(self, producer: Producer, batch: list[_Submission]) -> Producer | None:
        """One transaction for `batch`; returns the producer to use next (None: start anew)."""
        live = self._admissible(batch)
        if not live:
            return producer
        try:
            producer.begin_transaction()
        except KafkaException as exc:
            return self._recover(producer, live, exc.args[0])
        for index, submission in enumerate(live):
            try:
                self._produce(producer, submission)
            except KafkaException as exc:
                return self._refuse(producer, live, index, exc.args[0])
        try:
            producer.commit_transaction()
        except KafkaException as exc:
            return self._recover(producer, live, exc.args[0])
        self.transactions += 1
        for submission in live:
            self._settle(submission, None)
        return producer

    def _produce(self, producer: Producer, submission: _Submission) -> None:
        submission.messages = [None] * len(submission.records)
        for index, record in enumerate(submission.records):

            def on_delivery(
                _error: KafkaError | None,
                message: Message,
                i: int = index,
                s: _Submission = submission,
            ) -> None:
                s.messages[i] = message

            produce_waiting(producer, record, on_delivery)

    def _refuse(
        self, producer: Producer, live: list[_Submission], index: int, error: KafkaError
    ) -> Producer | None:
        """librdkafka would not queue a record of `live[index]` (too large, unknown topic):
        abort, fail that submission alone and queue the others again, first in line."""
        if not self._abort(producer, live, error):
            return None
        self._settle(live[index], error)
        with self._wake:
            self._queue.extendleft(reversed(live[:index] + live[index + 1 :]))
        return producer

    def _abort(self, producer: Producer, live: list[_Submission], error: KafkaError) -> bool:
        """Abort the open transaction; if that fails too, fail `live` (the producer is then
        replaced, and the new one's initialisation aborts the transaction)."""
        try:
            producer.abort_transaction()
        except KafkaException as exc:
            log.warning("abort failed; restarting the producer", extra={"error": str(exc)})
            self._fail(live, error)
            return False
        return True

    def _recover(
        self, producer: Producer, live: list[_Submission], error: KafkaError
    ) -> Producer | None:
        """After a failed transaction: abort it and fail its records, or, when its outcome
        is unknown or the producer is unusable, start a new producer (which aborts it)."""
        if error.txn_requires_abort():
            if not self._abort(producer, live, error):
                return None
            log.warning("transaction aborted", extra={"error": str(error)})
            self._fail(live, error)
            return producer
        uncertain = not error.fatal()
        log.warning(
            "transaction outcome unknown; restarting the producer"
            if uncertain
            else "producer failed; restarting it",
            extra={"error": str(error)},
        )
        self._fail(live, error, uncertain=uncertain)
        return None

    def _fail(self, live: list[_Submission], error: KafkaError, uncertain: bool = False) -> None:
        for submission in live:
            self._settle(submission, error, uncertain)

    def _fail_queued(self, error: KafkaError) -> None:
        with self._wake:
            left = list(self._queue)
            self._queue.clear()
        for submission in left:
            self._settle(submission, error)

    def _settle(
        self, submission: _Submission, error: KafkaError | None, uncertain: bool = False
    ) -> None:
        # RuntimeError: the event loop is gone (shutdown), nobody waits any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_resolve, submission, error, uncertain)


def _waited_too_long() -> KafkaError:
    return KafkaError(KafkaError._TIMED_OUT, "no transaction to join in time: not written")


def _resolve(submission: _Submission, error: KafkaError | None, uncertain: bool) -> None:
    future = submission.future
    if future.done():
        return
    if error is not None:
        future.set_exception(DeliveryFailed(error, uncertain=uncertain))
    else:
        future.set_result([m for m in submission.messages if m is not None])
