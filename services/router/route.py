"""Pure routing: an accepted message → delivery batches per destination, and events."""

from collections import defaultdict
from collections.abc import Callable
from datetime import datetime

from schemas.addresses import domain_of
from schemas.records import (
    AcceptedMessage,
    BatchRecipient,
    DeliveryBatch,
    DeliveryEvent,
    EventType,
    utc_now,
)
from schemas.rules import Rules

IsSuppressed = Callable[[str, str], bool]


def route(
    message: AcceptedMessage,
    rules: Rules,
    is_suppressed: IsSuppressed,
    throttle_keys: dict[str, str] | None = None,
) -> tuple[list[DeliveryBatch], list[DeliveryEvent]]:
    """Group the message's live recipients by domain into batches; suppressed ones get events.

    `throttle_keys` maps a domain to its throttle key where it is not the domain itself
    (a provider group found by MX lookup); domain-listed provider groups need no entry.
    """
    now = utc_now()
    by_domain: dict[str, list[BatchRecipient]] = defaultdict(list)
    events: list[DeliveryEvent] = []
    for index, recipient in enumerate(message.recipients):
        if recipient.suppressed or is_suppressed(message.tenant, recipient.email):
            events.append(_event(message, recipient.email, EventType.SUPPRESSED, now))
            continue
        by_domain[domain_of(recipient.email)].append(
            BatchRecipient(email=recipient.email, index=index, vars=recipient.vars)
        )
        events.append(_event(message, recipient.email, EventType.QUEUED, now))
    batches = []
    for domain, recipients in by_domain.items():
        key = (throttle_keys or {}).get(domain) or rules.throttle_key(domain)
        size = rules.shaping(key).max_recipients_per_batch
        for start in range(0, len(recipients), size):
            batches.append(
                DeliveryBatch(
                    message_id=message.id,
                    tenant=message.tenant,
                    pool=message.pool,
                    throttle_key=key,
                    domain=domain,
                    from_=message.from_,
                    content=message.content,
                    recipients=recipients[start : start + size],
                    accepted_at=message.accepted_at,
                    tags=message.tags,
                    metadata=message.metadata,
                )
            )
    return batches, events


def recheck(
    batch: DeliveryBatch, is_suppressed: IsSuppressed
) -> tuple[DeliveryBatch | None, list[DeliveryEvent]]:
    """A retried batch, minus recipients suppressed since: those get `suppressed` events."""
    live = [r for r in batch.recipients if not is_suppressed(batch.tenant, r.email)]
    if len(live) == len(batch.recipients):
        return batch, []
    now = utc_now()
    events = [
        DeliveryEvent(
            type=EventType.SUPPRESSED,
            message_id=batch.message_id,
            tenant=batch.tenant,
            recipient=r.email,
            ts=now,
            attempt=batch.attempt,
            pool=batch.pool,
            tags=batch.tags,
        )
        for r in batch.recipients
        if r not in live
    ]
    return (batch.model_copy(update={"recipients": live}) if live else None), events


def _event(
    message: AcceptedMessage, recipient: str, kind: EventType, ts: datetime
) -> DeliveryEvent:
    return DeliveryEvent(
        type=kind,
        message_id=message.id,
        tenant=message.tenant,
        recipient=recipient,
        ts=ts,
        pool=message.pool,
        tags=message.tags,
    )
