"""The delivery ledger with the real broker and a loopback SMTP server: what a sender
delivered is never sent again by it, even before its write is read back from the topic."""

from __future__ import annotations

import asyncio
import uuid

from services.sender.ledger import LEDGER_REPLY, DeliveryLedger
from tests.integration.conftest import topic
from tests.integration.test_sender_smtp import batch, deliverer, events_of
from tests.support.kafka import BOOTSTRAP
from tests.support.smtp_server import SmtpServerFactory

KAFKA = {"bootstrap.servers": BOOTSTRAP}
PRODUCER = KAFKA | {"acks": "all", "enable.idempotence": True}


async def test_a_copy_of_a_batch_this_sender_delivered_is_not_sent_again(
    kafka: object, smtp_server_factory: SmtpServerFactory
) -> None:
    """A batch held to a delay topic and its record read again after a restart are two
    copies; the second may reach the same sender before the first's write is read back."""
    server = smtp_server_factory()
    ledger = DeliveryLedger(KAFKA, PRODUCER, "default", topic=topic("mail.ledger"))
    # Its view is not started: only what this process wrote can tell it about the copy.
    sender = deliverer(server.port)
    sender.ledger = ledger
    original = batch("ledger.example", "a", "b").model_copy(update={"message_id": uuid.uuid4().hex})
    try:
        await sender.deliver(original)
        outputs = await sender.deliver(original.model_copy())
    finally:
        ledger.stop()
    events = events_of(outputs)
    assert [e.type.value for e in events] == ["delivered", "delivered"]
    assert all(e.smtp == LEDGER_REPLY for e in events)
    assert server.stats.messages == 2


async def test_two_copies_at_once_in_one_sender_are_sent_once(
    kafka: object, smtp_server_factory: SmtpServerFactory
) -> None:
    server = smtp_server_factory(reply_delay_s=0.05)
    ledger = DeliveryLedger(KAFKA, PRODUCER, "default", topic=topic("mail.ledger"))
    sender = deliverer(server.port)
    sender.ledger = ledger
    original = batch("ledger.example", "a", "b").model_copy(update={"message_id": uuid.uuid4().hex})
    try:
        first, second = await asyncio.gather(
            sender.deliver(original), sender.deliver(original.model_copy())
        )
    finally:
        ledger.stop()
    replies = [e.smtp for e in events_of(first) + events_of(second)]
    assert len(replies) == 4 and replies.count(LEDGER_REPLY) == 2
    assert server.stats.messages == 2


async def test_a_copy_is_sent_when_the_first_send_was_deferred(
    kafka: object, smtp_server_factory: SmtpServerFactory
) -> None:
    server = smtp_server_factory(data_reply="451 4.3.0 try again", reply_delay_s=0.05)
    ledger = DeliveryLedger(KAFKA, PRODUCER, "default", topic=topic("mail.ledger"))
    sender = deliverer(server.port)
    sender.ledger = ledger
    original = batch("ledger.example", "a").model_copy(update={"message_id": uuid.uuid4().hex})
    try:
        first, second = await asyncio.gather(
            sender.deliver(original), sender.deliver(original.model_copy())
        )
    finally:
        ledger.stop()
    assert [e.type.value for e in events_of(first) + events_of(second)] == ["deferred"] * 2
    assert server.stats.data_rejected == 2
