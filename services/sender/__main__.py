"""Sender for one IP pool: `mail.outbound.<pool>` → SMTP → `mail.events` and `mail.retry.*`."""

import asyncio
from collections.abc import Sequence
from datetime import timedelta

from confluent_kafka import Message

from schemas.catalogue import outbound_topic
from schemas.records import DeliveryBatch
from schemas.rules import load_rules
from services.runtime.codec import decode
from services.runtime.dns import MxResolver
from services.runtime.health import Health
from services.runtime.http import admin_app, serve_http
from services.runtime.loop import Output
from services.runtime.producer import AsyncProducer
from services.runtime.service import consumer_loop, run_service, run_until_stopped
from services.runtime.settings import split_host_port
from services.sender.deliver import Deliverer, DeliveryPolicy
from services.sender.settings import SenderSettings
from services.sender.smtp import SmtpOptions, SmtpPool


def build_deliverer(settings: SenderSettings) -> tuple[Deliverer, SmtpPool]:
    rules = load_rules(settings.rules)
    if settings.pool not in rules.pool_names():
        raise SystemExit(f"MAILRAIL_POOL={settings.pool!r} is not a pool in the rules file")
    pool = rules.pool(settings.pool)
    smtp = SmtpPool(
        SmtpOptions(
            ehlo=pool.ehlo,
            timeout_s=settings.smtp_timeout_s,
            source_address=pool.source_addresses[0] if pool.source_addresses else None,
            tls=rules.defaults.tls,
        ),
        max_connections=rules.defaults.max_connections,
        max_messages_per_connection=rules.defaults.max_messages_per_connection,
    )
    smart_host = split_host_port(settings.smart_host, 25) if settings.smart_host else None
    resolver = (
        None
        if smart_host
        else MxResolver(split_host_port(settings.dns, 53) if settings.dns else None)
    )
    policy = DeliveryPolicy(
        bounce_domain=rules.bounce_domain,
        verp_key=settings.verp_key.get_secret_value().encode(),
        retry_schedule_s=settings.retry_schedule_s,
        max_age=timedelta(seconds=settings.max_age_s),
        smtp_port=settings.smtp_port,
        smart_host=smart_host,
    )
    return Deliverer(pool, policy, smtp, resolver), smtp


async def main(settings: SenderSettings, stop: asyncio.Event) -> None:
    deliverer, smtp = build_deliverer(settings)
    health = Health()
    producer = AsyncProducer(settings.producer_config())

    async def on_batch(message: Message) -> Sequence[Output]:
        return await deliverer.deliver(decode(DeliveryBatch, message))

    loop = consumer_loop(
        settings,
        name="outbound",
        group_id=f"mailrail-sender-{settings.pool}",
        topics=[outbound_topic(settings.pool)],
        handler=on_batch,
        producer=producer,
        health=health,
    )
    try:
        await run_until_stopped(
            stop, serve_http(admin_app(health), settings.admin_addr, stop), loop.run(stop)
        )
    finally:
        await smtp.close()
        producer.close()


if __name__ == "__main__":
    run_service("sender", SenderSettings(), main)
