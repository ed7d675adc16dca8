"""Publishing one accepted message: the step shared by `POST /v1/messages` and `mail.submit`.

Order of writes, and why: (idempotency claim) → `mail.accepted` + `accepted` events, all
acknowledged (`acks=all`) → (idempotency `done`) → the answer. Nothing is answered as
accepted before Kafka holds it.
"""

import asyncio
import logging
import time
from dataclasses import dataclass

from schemas.api import MessageAccepted, MessageRequest
from schemas.rules import Rules
from services.ingest.accept import accept, accepted_events, answer, replayed_answer
from services.ingest.idempotency import (
    Claimed,
    ClaimFailed,
    Conflict,
    IdempotencyGuard,
    InProgress,
    Replay,
    body_digest,
)
from services.runtime.codec import accepted_output
from services.runtime.producer import DeliveryFailed, RecordProducer
from services.runtime.suppression import SuppressionView

log = logging.getLogger(__name__)


class Unavailable(Exception):
    """Kafka did not acknowledge in time: nothing was accepted."""


class KeyConflict(Exception):
    """The idempotency key was first used with another body."""


class KeyInProgress(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__("a request with this idempotency key is still in progress")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Published:
    answer: MessageAccepted
    #: True when the answer is the stored first answer of an earlier request with the same key.
    replayed: bool = False


@dataclass
class Publisher:
    rules: Rules
    suppressions: SuppressionView
    producer: RecordProducer
    idempotency: IdempotencyGuard
    timeout_s: float

    async def publish(
        self,
        request: MessageRequest,
        tenant: str,
        idempotency_key: str | None = None,
        wait_s: float | None = None,
    ) -> Published:
        """Validate, accept and store one message. Raises UnknownPool / InvalidField (bad
        request), KeyConflict, KeyInProgress, or Unavailable."""
        accepted = accept(
            request, tenant, self.rules, self.suppressions.is_suppressed, idempotency_key
        )
        deadline = time.monotonic() + self.producer.settle_s
        claim: Claimed | None = None
        if idempotency_key is not None:
            try:
                decision = await self.idempotency.begin(
                    tenant,
                    idempotency_key,
                    body_digest(request),
                    self.timeout_s if wait_s is None else wait_s,
                    self.producer.settle_s,
                )
            except ClaimFailed as exc:
                raise Unavailable(str(exc)) from None
            if isinstance(decision, Replay):
                return Published(
                    replayed_answer(request, decision.message_id, decision.suppressed), True
                )
            if isinstance(decision, Conflict):
                raise KeyConflict
            if isinstance(decision, InProgress):
                raise KeyInProgress(decision.retry_after_s)
            claim = decision
            accepted = accepted.model_copy(update={"id": claim.message_id})
            deadline = time.monotonic() + self.producer.settle_s
        outputs = [accepted_output(accepted), *accepted_events(accepted)]
        # The producer settles every send itself (stored, or failed and not stored) within
        # its `settle_s`; waiting less could answer 503 for a message stored a moment later.
        records = [(o.topic, o.value, o.key, o.headers) for o in outputs]
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                await self.producer.send_all(records)
        except (TimeoutError, DeliveryFailed) as exc:
            stored_maybe = not isinstance(exc, DeliveryFailed) or exc.uncertain
            if claim is not None and not stored_maybe:
                await self.idempotency.release(claim, self.timeout_s)
            raise Unavailable(str(exc) or "timed out") from None
        if claim is not None:
            suppressed = [i for i, r in enumerate(accepted.recipients) if r.suppressed]
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self.idempotency.finish(claim, suppressed)
            except (TimeoutError, DeliveryFailed) as exc:
                # The message is stored, so the answer is 202 all the same; a retry with
                # this key waits out the claim's lease and may then publish it again.
                log.warning(
                    "message stored but its idempotency answer was not",
                    extra={"message_id": accepted.id, "error": str(exc)},
                )
        return Published(answer(accepted))
