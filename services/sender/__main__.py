"""Sender for one IP pool: `mail.outbound.<pool>` → SMTP → `mail.events` and `mail.retry.*`."""

import asyncio
import contextlib
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
from services.sender import metrics
from services.sender.controls import ControlView
from services.sender.deliver import Deliverer, DeliveryPolicy
from services.sender.settings import SenderSettings
from services.sender.smtp import SmtpOptions, SmtpPool

METRICS_INTERVAL_S = 5.0


def build_deliverer(settings: SenderSettings, controls: ControlView) -> tuple[Deliverer, SmtpPool]:
    rules = load_rules(settings.rules)
    if settings.pool not in rules.pool_names():
        raise SystemExit(f"MAILRAIL_POOL={settings.pool!r} is not a pool in the rules file")
    pool = rules.pool(settings.pool)
    smtp = SmtpPool(
        SmtpOptions(
            ehlo=pool.ehlo,
            source_address=pool.source_addresses[0] if pool.source_addresses else None,
            command_timeout_s=settings.smtp_timeout_s,
        )
    )
    smart_host = split_host_port(settings.smart_host, 25) if settings.smart_host else None
    resolver = None
    if smart_host is None:
        resolver = MxResolver(split_host_port(settings.dns, 53) if settings.dns else None)
    policy = DeliveryPolicy(
        bounce_domain=rules.bounce_domain,
        verp_key=settings.verp_key.get_secret_value().encode(),
        retry_schedule_s=settings.retry_schedule_s,
        max_age=timedelta(seconds=settings.max_age_s),
        smtp_port=settings.smtp_port,
        smart_host=smart_host,
    )
    return Deliverer(pool, rules, policy, smtp, resolver, controls.controls), smtp


async def publish_metrics(
    deliverer: Deliverer, smtp: SmtpPool, pool: str, stop: asyncio.Event
) -> None:
    """Refresh the per-destination gauges until stopped."""
    while not stop.is_set():
        for destination in deliverer.destinations.all():
            labels = (pool, destination.key)
            metrics.DESTINATION_RATE.labels(*labels).set(destination.observed_per_s())
            metrics.DESTINATION_QUOTA.labels(*labels).set(destination.effective_rate_per_s() or -1)
            metrics.DESTINATION_BACKOFF.labels(*labels).set(destination.state.factor)
            metrics.DESTINATION_CONCURRENCY.labels(*labels).set(destination.concurrency.in_use)
            metrics.DESTINATION_WAITING.labels(*labels).set(destination.waiting)
        metrics.CONNECTIONS_OPEN.labels(pool).set(smtp.open_connections)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), METRICS_INTERVAL_S)


async def main(settings: SenderSettings, stop: asyncio.Event) -> None:
    health = Health()
    controls = ControlView(settings.kafka_common())
    controls.start()
    health.add_check("controls", lambda: controls.ready)
    deliverer, smtp = build_deliverer(settings, controls)
    await asyncio.to_thread(controls.wait_ready, 30.0)
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
            stop,
            serve_http(admin_app(health), settings.admin_addr, stop),
            loop.run(stop),
            publish_metrics(deliverer, smtp, settings.pool, stop),
        )
    finally:
        await smtp.close()
        producer.close()
        controls.stop()


if __name__ == "__main__":
    run_service("sender", SenderSettings(), main)
