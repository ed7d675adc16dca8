"""The `mail.submit` consumer: upstream services' records, validated like HTTP requests and
deduplicated exactly like `Idempotency-Key` on HTTP.

A record's idempotency key is its body's `idempotency_key`; a record without one uses its
Kafka record key (design.md: the key is "the idempotency key if any"). When both are
present, the body's field wins and the record key is only the partitioning key.
"""

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from confluent_kafka import Message

from schemas.records import Submission
from services.ingest.accept import InvalidField, UnknownPool
from services.ingest.limits import request_limit
from services.ingest.publish import KeyConflict, KeyInProgress, Publisher, Unavailable
from services.runtime.codec import decode
from services.runtime.loop import BadRecord, Output

log = logging.getLogger(__name__)

#: Kafka outages are retried this many times before the loop stops (without committing).
UNAVAILABLE_RETRIES = 5
UNAVAILABLE_BACKOFF_S = 1.0
#: The longest idempotency key, in characters (as `Idempotency-Key` on HTTP).
MAX_KEY_CHARS = 200
#: Where the key came from, as `mail.rejected` names the field at fault.
BODY_FIELD = "idempotency_key"
RECORD_KEY_FIELD = "key"


@dataclass(frozen=True)
class SubmitKey:
    value: str
    #: `BODY_FIELD` or `RECORD_KEY_FIELD`.
    field: str


def submit_key(submission: Submission, record_key: bytes | str | None) -> SubmitKey | None:
    """The record's idempotency key: the body's `idempotency_key`, else a non-empty record
    key, else none. Raises BadRecord for a key that cannot be one (empty in the body, not
    UTF-8, longer than `MAX_KEY_CHARS`): such a record goes to `mail.rejected`."""
    if submission.idempotency_key is not None:
        if not submission.idempotency_key:
            raise BadRecord("idempotency_key is empty", "invalid_request", BODY_FIELD)
        return SubmitKey(submission.idempotency_key, BODY_FIELD)
    if not record_key:
        return None
    if isinstance(record_key, bytes):
        try:
            record_key = record_key.decode()
        except UnicodeDecodeError:
            raise BadRecord(
                "the record key (the idempotency key of a body without idempotency_key)"
                " is not valid UTF-8",
                "invalid_request",
                RECORD_KEY_FIELD,
            ) from None
    if len(record_key) > MAX_KEY_CHARS:
        raise BadRecord(
            f"the record key (the idempotency key of a body without idempotency_key)"
            f" is longer than {MAX_KEY_CHARS} characters",
            "invalid_request",
            RECORD_KEY_FIELD,
        )
    return SubmitKey(record_key, RECORD_KEY_FIELD)


def conflict(key: SubmitKey) -> BadRecord:
    """What HTTP answers 409 `idempotency_conflict`, as a `mail.rejected` reason."""
    if key.field == BODY_FIELD:
        reason = "idempotency_key was used with a different body"
    else:
        reason = "the record key (the idempotency key) was used with a different body"
    return BadRecord(reason, "idempotency_conflict", key.field)


class SubmitHandler:
    def __init__(self, publisher: Publisher, max_message_bytes: int, lease_s: float) -> None:
        self._publisher = publisher
        self._max_message_bytes = max_message_bytes
        #: A record whose key is held by another request waits that long for its answer.
        self._wait_s = lease_s + publisher.timeout_s

    async def __call__(self, message: Message) -> Sequence[Output]:
        """Publishes itself (the idempotency answer must follow `mail.accepted`), so it
        returns no outputs; the loop commits the record once this returns."""
        value = message.value()
        if value is not None and len(value) > request_limit(self._max_message_bytes):
            raise BadRecord("record larger than the message size limit", "too_large")
        submission = decode(Submission, message)
        raw = submission.raw_bytes()
        if raw is not None and len(raw) > self._max_message_bytes:
            raise BadRecord("message larger than the size limit", "too_large", "raw")
        key = submit_key(submission, message.key())
        for attempt in range(UNAVAILABLE_RETRIES):
            try:
                await self._publisher.publish(
                    submission,
                    submission.tenant,
                    None if key is None else key.value,
                    self._wait_s,
                )
                return []
            except UnknownPool as exc:
                raise BadRecord(str(exc), "invalid_request", "pool") from None
            except InvalidField as exc:
                raise BadRecord(str(exc), "invalid_request", exc.field) from None
            except KeyConflict:
                assert key is not None
                raise conflict(key) from None
            except (KeyInProgress, Unavailable) as exc:
                if attempt == UNAVAILABLE_RETRIES - 1:
                    raise
                log.warning("submit retry", extra={"error": str(exc), "attempt": attempt})
                await asyncio.sleep(UNAVAILABLE_BACKOFF_S * 2**attempt)
        return []
