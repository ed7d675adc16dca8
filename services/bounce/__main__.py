"""Bounce service: `mail.events` → `mail.suppression`."""

import asyncio
from collections.abc import Sequence

from confluent_kafka import Message

from schemas.catalogue import EVENTS
from schemas.records import DeliveryEvent
from services.bounce.settings import BounceSettings
from services.bounce.suppress import suppression_for
from services.runtime.codec import decode, suppression_output
from services.runtime.health import Health
from services.runtime.http import admin_app, serve_http
from services.runtime.loop import Output
from services.runtime.producer import AsyncProducer
from services.runtime.service import consumer_loop, run_service, run_until_stopped


async def on_event(message: Message) -> Sequence[Output]:
    entry = suppression_for(decode(DeliveryEvent, message))
    return [] if entry is None else [suppression_output(entry)]


async def main(settings: BounceSettings, stop: asyncio.Event) -> None:
    health = Health()
    producer = AsyncProducer(settings.producer_config())
    loop = consumer_loop(
        settings,
        name="events",
        group_id=settings.group_id,
        topics=[EVENTS],
        handler=on_event,
        producer=producer,
        health=health,
    )
    try:
        await run_until_stopped(
            stop, serve_http(admin_app(health), settings.admin_addr, stop), loop.run(stop)
        )
    finally:
        producer.close()


if __name__ == "__main__":
    run_service("bounce", BounceSettings(), main)
