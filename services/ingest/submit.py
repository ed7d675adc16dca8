"""The `mail.submit` consumer: upstream services' records, validated like HTTP requests."""

from collections.abc import Sequence

from confluent_kafka import Message

from schemas.records import Submission
from schemas.rules import Rules
from services.ingest.accept import UnknownPool, accept
from services.ingest.limits import request_limit
from services.runtime.codec import accepted_output, decode
from services.runtime.loop import BadRecord, Output
from services.runtime.suppression import SuppressionView


class SubmitHandler:
    def __init__(self, rules: Rules, suppressions: SuppressionView, max_message_bytes: int) -> None:
        self._rules = rules
        self._suppressions = suppressions
        self._max_message_bytes = max_message_bytes

    async def __call__(self, message: Message) -> Sequence[Output]:
        value = message.value()
        if value is not None and len(value) > request_limit(self._max_message_bytes):
            raise BadRecord("record larger than the message size limit", "too_large")
        submission = decode(Submission, message)
        raw = submission.raw_bytes()
        if raw is not None and len(raw) > self._max_message_bytes:
            raise BadRecord("message larger than the size limit", "too_large", "raw")
        try:
            accepted = accept(
                submission,
                submission.tenant,
                self._rules,
                self._suppressions.is_suppressed,
                submission.idempotency_key,
            )
        except UnknownPool as exc:
            raise BadRecord(str(exc), "invalid_request", "pool") from None
        return [accepted_output(accepted)]
