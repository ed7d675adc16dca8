"""The `mail.events` handler: what each delivery event means for suppression."""

from __future__ import annotations

from collections.abc import Sequence

from confluent_kafka import Message

from schemas.categories import Category
from schemas.records import DeliveryEvent
from services.bounce.classify import Classifier
from services.bounce.soft import is_soft_bounce, soft_bounce_output
from services.bounce.suppress import suppression_for
from services.runtime.codec import decode, suppression_output
from services.runtime.loop import Output


class EventsHandler:
    """A hard bounce of a bad address, a complaint or an unsubscribe → `mail.suppression`;
    a soft bounce → `mail.soft-bounces`, re-keyed by address to be counted (`soft.py`)."""

    def __init__(self, soft_categories: frozenset[Category], rules: Classifier) -> None:
        self._soft_categories = soft_categories
        self._rules = rules

    async def __call__(self, message: Message) -> Sequence[Output]:
        event: DeliveryEvent = decode(DeliveryEvent, message)
        outputs = []
        entry = suppression_for(event)
        if entry is not None:
            outputs.append(suppression_output(entry))
        if is_soft_bounce(event, self._soft_categories, self._rules):
            outputs.append(soft_bounce_output(event, message.value() or b""))
        return outputs
