"""Bounce service: the bounce domain's SMTP server (DSNs, ARF complaints) → `mail.events`;
`mail.events` → `mail.suppression` (hard bounces, complaints, unsubscribes) and
`mail.soft-bounces`; `mail.soft-bounces` → `mail.suppression` (the soft-bounce limit)."""

import asyncio
from datetime import timedelta

from schemas.catalogue import EVENTS, SOFT_BOUNCE_RETENTION, SOFT_BOUNCES
from schemas.rules import load_rules
from services.bounce import classify
from services.bounce.handlers import EventsHandler
from services.bounce.match import Keys
from services.bounce.oneclick import UnsubscribeSettings
from services.bounce.receiver import Policy, ReportHandler, serve_smtp
from services.bounce.settings import BounceSettings
from services.bounce.soft import SoftBounceCounter, SoftBounceHandler, kafka_history
from services.runtime.health import Health
from services.runtime.http import admin_app, serve_http
from services.runtime.producer import AsyncProducer
from services.runtime.service import consumer_loop, run_service, run_until_stopped


def policy_of(settings: BounceSettings, unsubscribe: UnsubscribeSettings) -> Policy:
    return Policy(
        bounce_domain=load_rules(settings.rules).bounce_domain.lower().rstrip("."),
        keys=Keys(settings.verp_key.get_secret_value().encode(), unsubscribe.key()),
        classifier=classify.load_rules(settings.classification_rules),
        report_local_parts=frozenset(p.lower() for p in settings.report_local_parts),
        unsubscribe_address=unsubscribe.unsubscribe_mailto,
        max_recipients=settings.max_report_recipients,
    )


async def main(settings: BounceSettings, stop: asyncio.Event) -> None:
    window = timedelta(seconds=settings.soft_bounce_window_s)
    if window > SOFT_BOUNCE_RETENTION:
        raise SystemExit(
            f"MAILRAIL_SOFT_BOUNCE_WINDOW_S is longer than mail.soft-bounces keeps records"
            f" ({SOFT_BOUNCE_RETENTION.days} days)"
        )
    policy = policy_of(settings, UnsubscribeSettings())
    health = Health()
    producer = AsyncProducer(settings.producer_config())
    events = consumer_loop(
        settings,
        name="events",
        group_id=settings.group_id,
        topics=[EVENTS],
        handler=EventsHandler(settings.soft_bounce_categories, policy.classifier),
        producer=producer,
        health=health,
    )
    counter = SoftBounceCounter(
        settings.soft_bounce_limit, window, settings.soft_bounce_max_addresses
    )
    soft = consumer_loop(
        settings,
        name="soft-bounces",
        group_id=settings.soft_group_id,
        topics=[SOFT_BOUNCES],
        handler=SoftBounceHandler(counter, kafka_history(settings.kafka_common())),
        producer=producer,
        health=health,
    )
    receiver = ReportHandler(policy, producer, settings.store_timeout_s)
    try:
        await run_until_stopped(
            stop,
            serve_http(admin_app(health), settings.admin_addr, stop),
            serve_smtp(
                receiver,
                settings.bounce_smtp_addr,
                stop,
                settings.smtp_hostname or policy.bounce_domain,
                settings.max_report_bytes,
                health,
            ),
            events.run(stop),
            soft.run(stop),
        )
    finally:
        producer.close()


if __name__ == "__main__":
    run_service("bounce", BounceSettings(), main)
