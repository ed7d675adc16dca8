"""Ingest: the HTTP API and the `mail.submit` consumer, both publishing `mail.accepted`;
the status view and the webhook dispatcher follow `mail.events`."""

import asyncio
import contextlib
from collections.abc import Awaitable

from schemas.catalogue import EVENTS, SUBMIT
from schemas.rules import load_rules
from services.ingest.api import IngestDeps, create_app, with_limits
from services.ingest.auth import ApiKeys
from services.ingest.idempotency import IdempotencyGuard
from services.ingest.publish import Publisher
from services.ingest.ratelimit import RateLimiter, parse_rates
from services.ingest.settings import IngestSettings
from services.ingest.status import StatusView
from services.ingest.submit import SubmitHandler
from services.ingest.webhooks import WebhookDispatcher, load_webhooks
from services.runtime.consume import start_at_end
from services.runtime.health import Health
from services.runtime.http import serve_http
from services.runtime.loop import ConsumerLoop
from services.runtime.service import consumer_loop, run_service, run_until_stopped
from services.runtime.suppression import SuppressionView
from services.runtime.transactional import TransactionalProducer

HEARTBEAT_S = 1.0
LINGER_MS = 1


async def heartbeat(health: Health, stop: asyncio.Event) -> None:
    """Liveness of the HTTP side: the event loop that serves requests still turns."""
    while not stop.is_set():
        health.beat("http")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), HEARTBEAT_S)
    health.forget("http")


def load_keys(settings: IngestSettings) -> ApiKeys:
    keys = ApiKeys({})
    if settings.api_keys is not None:
        keys = keys.merged(ApiKeys.from_pairs(settings.api_keys.get_secret_value()))
    if settings.api_keys_file is not None:
        pepper = settings.api_key_pepper
        keys = keys.merged(
            ApiKeys.from_file(
                settings.api_keys_file, pepper.get_secret_value().encode() if pepper else b""
            )
        )
    return keys


async def main(settings: IngestSettings, stop: asyncio.Event) -> None:
    rules = load_rules(settings.rules)
    keys = load_keys(settings)
    webhooks = load_webhooks(settings.webhooks_file, settings.webhooks)
    health = Health()
    suppressions = SuppressionView(settings.kafka_common())
    producer = TransactionalProducer(
        # Every request waits for its commit: batch for 1 ms, not the default 5.
        settings.producer_config() | {"linger.ms": LINGER_MS},
        settings.producer_transactional_id(),
        admission_s=settings.produce_timeout_s,
        transaction_timeout_s=settings.transaction_timeout_s,
    )
    idempotency = IdempotencyGuard(
        settings.kafka_common(),
        producer,
        lease_s=settings.idempotency_lease_s,
        max_keys=settings.idempotency_max_keys,
    )
    status = StatusView(
        settings.kafka_common(),
        settings.status_window_s,
        settings.status_max_events,
        settings.state_dir,
    )
    views = (suppressions, idempotency, status)
    for view in views:
        view.start()
    health.add_check("suppressions", lambda: suppressions.ready)
    health.add_check("idempotency", lambda: idempotency.ready)
    publisher = Publisher(rules, suppressions, producer, idempotency, settings.produce_timeout_s)
    deps = IngestDeps(
        keys=keys,
        publisher=publisher,
        limiter=RateLimiter(
            settings.rate_recipients_per_s,
            settings.rate_burst_recipients,
            parse_rates(settings.tenant_rates),
        ),
        status=status,
        health=health,
        max_message_bytes=settings.max_message_bytes,
        retry_after_s=settings.retry_after_s,
    )
    app = with_limits(create_app(deps), settings.max_message_bytes)
    tasks: list[Awaitable[None]] = [serve_http(app, settings.http_addr, stop)]
    if settings.submit_consumer:
        submit = consumer_loop(
            settings,
            name="submit",
            group_id=settings.group_id,
            topics=[SUBMIT],
            handler=SubmitHandler(
                publisher, settings.max_message_bytes, settings.idempotency_lease_s
            ),
            producer=producer,
            health=health,
        )
        tasks.append(submit.run(stop))
    if webhooks:
        dispatcher = WebhookDispatcher(
            webhooks,
            max_attempts=settings.webhook_max_attempts,
            backoff_s=settings.webhook_backoff_s,
            timeout_s=settings.webhook_timeout_s,
        )
        hooks_config = settings.consumer_config(settings.webhook_group_id) | {
            "auto.offset.reset": settings.webhook_start
        }
        if settings.webhook_start == "latest":
            # "From now on" means from this start-up, not from the first fetch.
            await asyncio.to_thread(start_at_end, hooks_config, EVENTS)
        hooks = ConsumerLoop(
            name="webhooks",
            consumer_config=hooks_config,
            topics=[EVENTS],
            handler=dispatcher,
            producer=producer,
            health=health,
            max_in_flight=settings.webhook_max_in_flight,
            commit_interval_s=settings.commit_interval_s,
            drain_timeout_s=settings.drain_timeout_s,
        )
        health.add_check("webhooks", lambda: bool(hooks.assigned))
        tasks.append(hooks.run(stop))
    try:
        await run_until_stopped(stop, heartbeat(health, stop), *tasks)
    finally:
        if webhooks:
            await dispatcher.close()
        producer.close()
        for view in views:
            view.stop()


if __name__ == "__main__":
    run_service("ingest", IngestSettings(), main)
