"""Pure acceptance: a validated request becomes the `AcceptedMessage` ingest publishes."""

import os
import time
from collections.abc import Callable

from schemas.api import MessageAccepted, MessageRequest, RecipientStatus
from schemas.records import AcceptedMessage, AcceptedRecipient, utc_now
from schemas.rules import Rules


class UnknownPool(ValueError):
    pass


def new_message_id() -> str:
    """32 hex characters: 48 bits of milliseconds then 80 random bits (sortable by time)."""
    return f"{int(time.time() * 1000):012x}{os.urandom(10).hex()}"


def accept(
    request: MessageRequest,
    tenant: str,
    rules: Rules,
    is_suppressed: Callable[[str, str], bool],
    idempotency_key: str | None = None,
    message_id: str | None = None,
) -> AcceptedMessage:
    pool = request.pool or rules.default_pool
    if pool not in rules.pool_names():
        raise UnknownPool(f"unknown pool {pool!r}; pools: {', '.join(rules.pool_names())}")
    return AcceptedMessage(
        id=message_id or new_message_id(),
        tenant=tenant,
        accepted_at=utc_now(),
        from_=request.from_,
        content=request.content(),
        recipients=[
            AcceptedRecipient(email=r.email, vars=r.vars, suppressed=is_suppressed(tenant, r.email))
            for r in request.recipients()
        ],
        pool=pool,
        tags=request.tags,
        metadata=request.metadata,
        idempotency_key=idempotency_key,
    )


def answer(message: AcceptedMessage) -> MessageAccepted:
    return MessageAccepted(
        id=message.id,
        recipients=[
            RecipientStatus(email=r.email, status="suppressed" if r.suppressed else "queued")
            for r in message.recipients
        ],
    )
