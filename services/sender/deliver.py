"""Deliver one `DeliveryBatch`: find the route, send each recipient, turn replies into records.

Every recipient of the batch ends the attempt in exactly one of: delivered, bounced,
deferred (with a retry record), expired. Nothing here raises for a remote failure.
"""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from schemas.catalogue import retry_topic
from schemas.categories import Category
from schemas.records import (
    BatchRecipient,
    DeliveryBatch,
    DeliveryEvent,
    EventType,
    SmtpReply,
    utc_now,
)
from schemas.rules import Pool
from services.bounce.classify import classify
from services.bounce.verp import encode_return_path
from services.runtime.codec import batch_output, event_output
from services.runtime.dns import MxHost, MxResolver, MxRoute
from services.runtime.loop import Output
from services.sender.compose import compose
from services.sender.retry import expired, next_delay, tier_for
from services.sender.smtp import ConnectFailed, SmtpPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveryPolicy:
    bounce_domain: str
    verp_key: bytes
    retry_schedule_s: list[float]
    max_age: timedelta
    smtp_port: int = 25
    smart_host: tuple[str, int] | None = None


@dataclass(frozen=True)
class Outcome:
    recipient: BatchRecipient
    reply: SmtpReply
    mx: str | None


class Deliverer:
    def __init__(
        self, pool: Pool, policy: DeliveryPolicy, smtp: SmtpPool, resolver: MxResolver | None
    ) -> None:
        self._pool = pool
        self._policy = policy
        self._smtp = smtp
        self._resolver = resolver

    async def deliver(self, batch: DeliveryBatch) -> list[Output]:
        route = await self._route(batch.domain)
        outcomes: list[Outcome] = []
        for recipient in batch.recipients:
            if route.failure is not None:
                outcomes.append(Outcome(recipient, route.failure, None))
            else:
                outcomes.append(await self._send(batch, recipient, route.hosts))
        return self._records(batch, outcomes)

    async def _route(self, domain: str) -> MxRoute:
        smart_host = self._policy.smart_host
        if smart_host is not None:
            return MxRoute(hosts=(MxHost(smart_host[0], 0, (smart_host[0],)),))
        assert self._resolver is not None
        return await self._resolver.resolve(domain)

    async def _send(
        self, batch: DeliveryBatch, recipient: BatchRecipient, hosts: tuple[MxHost, ...]
    ) -> Outcome:
        policy = self._policy
        port = policy.smart_host[1] if policy.smart_host else policy.smtp_port
        return_path = encode_return_path(
            batch.message_id, recipient.index, policy.bounce_domain, batch.tenant, policy.verp_key
        )
        data = compose(batch, recipient)
        last = SmtpReply(code=451, enhanced="4.4.1", text="no host reachable")
        tried: str | None = None
        for host in hosts:
            for address in host.addresses:
                tried = host.name
                try:
                    reply = await self._smtp.send(address, port, return_path, recipient.email, data)
                except ConnectFailed as failed:
                    last = failed.reply
                    continue
                return Outcome(recipient, reply, host.name)
        return Outcome(recipient, last, tried)

    def _records(self, batch: DeliveryBatch, outcomes: list[Outcome]) -> list[Output]:
        now = utc_now()
        outputs: list[Output] = []
        deferred: list[BatchRecipient] = []
        delay = next_delay(batch.attempt, self._policy.retry_schedule_s)
        too_old = expired(batch.accepted_at, now, delay, self._policy.max_age)
        for outcome in outcomes:
            event_type, category, hard = self._verdict(outcome.reply, too_old)
            if event_type is EventType.DEFERRED:
                deferred.append(outcome.recipient)
            outputs.append(
                event_output(
                    DeliveryEvent(
                        type=event_type,
                        message_id=batch.message_id,
                        tenant=batch.tenant,
                        recipient=outcome.recipient.email,
                        ts=now,
                        attempt=batch.attempt,
                        pool=batch.pool,
                        mx=outcome.mx,
                        smtp=outcome.reply,
                        category=category,
                        hard=hard,
                        tags=batch.tags,
                    )
                )
            )
        if deferred:
            outputs.append(self._retry(batch, deferred, now, delay))
        return outputs

    @staticmethod
    def _verdict(reply: SmtpReply, too_old: bool) -> tuple[EventType, Category | None, bool | None]:
        if reply.code < 400:
            return EventType.DELIVERED, None, None
        verdict = classify(reply.code, reply.enhanced, reply.text)
        if reply.code >= 500:
            return EventType.BOUNCED, verdict.category, True
        if too_old:
            return EventType.EXPIRED, Category.EXPIRED, True
        return EventType.DEFERRED, verdict.category, False

    @staticmethod
    def _retry(
        batch: DeliveryBatch, recipients: list[BatchRecipient], now: datetime, delay: timedelta
    ) -> Output:
        retry = batch.model_copy(
            update={
                "recipients": recipients,
                "attempt": batch.attempt + 1,
                "not_before": now + delay,
            }
        )
        return batch_output(retry_topic(tier_for(delay)), retry)
