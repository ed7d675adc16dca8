"""Pure acceptance: a validated request becomes the `AcceptedMessage` ingest publishes."""

import os
import re
import time
from collections.abc import Callable

import orjson

from schemas.api import MessageAccepted, MessageRequest, RecipientStatus
from schemas.catalogue import EVENTS
from schemas.records import AcceptedMessage, AcceptedRecipient, EventType, utc_now
from schemas.rules import Rules
from services.runtime import metrics
from services.runtime.loop import Output

#: The sender's `{{name}}` placeholders (services/sender/compose.py).
_VARIABLE = re.compile(r"\{\{\s*([A-Za-z0-9_.-]+)\s*\}\}")
_LINE_BREAKS = re.compile(r"[\r\n\x00]")


class UnknownPool(ValueError):
    pass


class InvalidField(ValueError):
    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def new_message_id() -> str:
    """32 hex characters: 48 bits of milliseconds then 80 random bits (sortable by time)."""
    return f"{int(time.time() * 1000):012x}{os.urandom(10).hex()}"


def check_request(request: MessageRequest) -> None:
    """What the model alone cannot see: a variable used in the subject (a header) may not
    carry a line break, or it would inject headers; no variable may carry NUL."""
    in_subject = set(_VARIABLE.findall(request.subject or ""))
    for index, recipient in enumerate(request.to):
        if isinstance(recipient, str):
            continue
        for name, value in recipient.vars.items():
            if "\x00" in value or (name in in_subject and _LINE_BREAKS.search(value)):
                where = "the subject" if name in in_subject else "a message"
                raise InvalidField(
                    f"variable {name!r} contains CR, LF or NUL and is used in {where}",
                    f"to[{index}].vars.{name}",
                )


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
    check_request(request)
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


def replayed_answer(
    request: MessageRequest, message_id: str, suppressed: tuple[int, ...]
) -> MessageAccepted:
    """The first answer to a request, rebuilt from the same body and what was stored."""
    marked = set(suppressed)
    return MessageAccepted(
        id=message_id,
        recipients=[
            RecipientStatus(email=r.email, status="suppressed" if i in marked else "queued")
            for i, r in enumerate(request.recipients())
        ],
    )


def accepted_events(message: AcceptedMessage) -> list[Output]:
    """One `accepted` DeliveryEvent per recipient, the first entry of each timeline.

    Encoded directly (not through the model) because a batch has up to 1,000 of them;
    tests/unit/test_ingest_accept.py checks each parses as a `DeliveryEvent`.
    """
    common = {
        "v": 1,
        "type": EventType.ACCEPTED.value,
        "message_id": message.id,
        "tenant": message.tenant,
        "ts": message.accepted_at.isoformat().replace("+00:00", "Z"),
        "attempt": 0,
        "pool": message.pool,
        "tags": message.tags,
    }
    key = message.id.encode()
    metrics.EVENTS.labels(EventType.ACCEPTED.value, message.pool).inc(len(message.recipients))
    return [
        Output(EVENTS, orjson.dumps(common | {"recipient": r.email}), key)
        for r in message.recipients
    ]
