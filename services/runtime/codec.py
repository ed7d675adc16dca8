"""How each record type is keyed, encoded and decoded on its topic: once, for every service."""

from typing import TypeVar

from confluent_kafka import Message
from pydantic import BaseModel, ValidationError

from schemas.catalogue import ACCEPTED, CONTROL, EVENTS, SUPPRESSION
from schemas.records import (
    AcceptedMessage,
    ControlCommand,
    DeliveryBatch,
    DeliveryEvent,
    EventType,
    Suppression,
    suppression_key,
)
from services.runtime import metrics
from services.runtime.loop import BadRecord, Output

M = TypeVar("M", bound=BaseModel)


def encode(model: BaseModel) -> bytes:
    return model.model_dump_json(by_alias=True, exclude_none=True).encode()


def event_output(event: DeliveryEvent) -> Output:
    metrics.EVENTS.labels(event.type.value, event.pool).inc()
    # An expiry ends a recipient as undeliverable: it counts as a bounce (category expired).
    if event.type in (EventType.BOUNCED, EventType.EXPIRED):
        metrics.BOUNCES.labels(event.pool, str(event.category or "other")).inc()
    return Output(EVENTS, encode(event), event.message_id)


def batch_output(topic: str, batch: DeliveryBatch) -> Output:
    return Output(topic, encode(batch), batch.throttle_key)


def accepted_output(message: AcceptedMessage) -> Output:
    return Output(ACCEPTED, encode(message), message.id)


def suppression_output(entry: Suppression) -> Output:
    return Output(SUPPRESSION, encode(entry), suppression_key(entry.tenant, entry.address))


def suppression_removal(tenant: str, address: str) -> Output:
    return Output(SUPPRESSION, None, suppression_key(tenant, address))


def decode(model: type[M], message: Message) -> M:
    """Parse a record's value, or raise `BadRecord` naming the first invalid field."""
    value = message.value()
    if value is None:
        raise BadRecord("empty value", "empty")
    try:
        return model.model_validate_json(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        raise BadRecord(f"not a valid {model.__name__}: {first['msg']}", "schema", field) from None


def control_output(command: ControlCommand) -> Output:
    return Output(CONTROL, encode(command), command.scope)
