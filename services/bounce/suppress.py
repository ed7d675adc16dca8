"""Pure suppression decisions: which delivery events stop future mail to an address."""

import logging

from pydantic import ValidationError

from schemas.categories import ADDRESS_CATEGORIES
from schemas.records import DeliveryEvent, EventType, Suppression, SuppressionReason

log = logging.getLogger(__name__)

_REASON_BY_TYPE = {
    EventType.COMPLAINED: SuppressionReason.COMPLAINT,
    EventType.UNSUBSCRIBED: SuppressionReason.UNSUBSCRIBE,
}


def suppression_for(event: DeliveryEvent) -> Suppression | None:
    """A hard bounce that says the address is bad, a complaint or an unsubscribe suppress.

    A block or policy rejection is hard for the message but says nothing about the address,
    so it never suppresses.
    """
    if not event.tenant or not event.recipient:
        return None
    if event.type is EventType.BOUNCED:
        if not event.hard or event.category not in ADDRESS_CATEGORIES:
            return None
        reason = SuppressionReason.HARD_BOUNCE
    elif event.type in _REASON_BY_TYPE:
        reason = _REASON_BY_TYPE[event.type]
    else:
        return None
    detail = None
    if event.smtp is not None:
        detail = " ".join(
            part for part in (str(event.smtp.code), event.smtp.enhanced, event.smtp.text) if part
        )
    try:
        return Suppression(
            tenant=event.tenant,
            address=event.recipient,
            reason=reason,
            created_at=event.ts,
            source_message_id=event.message_id or None,
            source_event=event.type,
            detail=detail,
        )
    except ValidationError:
        # A report can name an address we would never have accepted (`user@localhost`).
        log.warning(
            "not suppressing an invalid address",
            extra={"tenant": event.tenant, "recipient": event.recipient, "type": event.type},
        )
        return None
