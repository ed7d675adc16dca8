"""What an operator's MOVE or PURGE does to a batch, checked before anything else.

MOVE re-publishes the batch, unchanged but for its pool, to the other pool's outbound topic
(that pool's senders then own it; a hold for quota is dropped, since this pool's booked
slots mean nothing there). PURGE bounces every recipient of a batch accepted before the
command, with category `purged`: final, never offered to a server, and never a reason to
suppress the address.
"""

import logging
from collections.abc import Collection
from datetime import datetime

from schemas.catalogue import outbound_topic
from schemas.categories import Category
from schemas.records import ControlCommand, DeliveryBatch, DeliveryEvent, EventType, utc_now
from services.runtime.codec import batch_output, event_output
from services.runtime.controls import Controls
from services.runtime.loop import Output

log = logging.getLogger(__name__)


def steer(
    controls: Controls, batch: DeliveryBatch, pools: Collection[str], now: datetime | None = None
) -> list[Output] | None:
    """The batch's outputs if a MOVE or PURGE takes it over, else None (deliver it)."""
    now = now or utc_now()
    purge = controls.purge(batch, now)
    if purge is not None:
        return [purged(batch, r.email, purge, now) for r in batch.recipients]
    pool = controls.moved_to(batch, now)
    if pool is None:
        return None
    if pool not in pools:
        log.warning("move to an unknown pool ignored", extra={"pool": pool})
        return None
    moved = batch.model_copy(update={"pool": pool, "held_for": None, "not_before": None})
    return [batch_output(outbound_topic(pool), moved)]


def purged(batch: DeliveryBatch, recipient: str, command: ControlCommand, now: datetime) -> Output:
    reason = f": {command.reason}" if command.reason else ""
    return event_output(
        DeliveryEvent(
            type=EventType.BOUNCED,
            message_id=batch.message_id,
            tenant=batch.tenant,
            recipient=recipient,
            ts=now,
            attempt=batch.attempt,
            pool=batch.pool,
            category=Category.PURGED,
            hard=True,
            detail=f"purged by an operator ({command.scope}){reason}"[:500],
            tags=batch.tags,
        )
    )
