"""The `mail.submit` consumer: upstream services' records, validated like HTTP requests and
deduplicated by their `idempotency_key` exactly like `Idempotency-Key` on HTTP."""

import asyncio
import logging
from collections.abc import Sequence

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
        for attempt in range(UNAVAILABLE_RETRIES):
            try:
                await self._publisher.publish(
                    submission, submission.tenant, submission.idempotency_key, self._wait_s
                )
                return []
            except UnknownPool as exc:
                raise BadRecord(str(exc), "invalid_request", "pool") from None
            except InvalidField as exc:
                raise BadRecord(str(exc), "invalid_request", exc.field) from None
            except KeyConflict:
                raise BadRecord(
                    "idempotency_key was used with a different body",
                    "idempotency_conflict",
                    "idempotency_key",
                ) from None
            except (KeyInProgress, Unavailable) as exc:
                if attempt == UNAVAILABLE_RETRIES - 1:
                    raise
                log.warning("submit retry", extra={"error": str(exc), "attempt": attempt})
                await asyncio.sleep(UNAVAILABLE_BACKOFF_S * 2**attempt)
        return []
