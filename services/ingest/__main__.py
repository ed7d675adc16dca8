"""Ingest: the HTTP API and the `mail.submit` consumer, both publishing `mail.accepted`."""

import asyncio

from schemas.catalogue import SUBMIT
from schemas.rules import load_rules
from services.ingest.api import IngestDeps, create_app, with_limits
from services.ingest.auth import ApiKeys
from services.ingest.settings import IngestSettings
from services.ingest.submit import SubmitHandler
from services.runtime.health import Health
from services.runtime.http import serve_http
from services.runtime.producer import AsyncProducer
from services.runtime.service import consumer_loop, run_service, run_until_stopped
from services.runtime.suppression import SuppressionView


def load_keys(settings: IngestSettings) -> ApiKeys:
    keys = ApiKeys({})
    if settings.api_keys is not None:
        keys = keys.merged(ApiKeys.from_pairs(settings.api_keys.get_secret_value()))
    if settings.api_keys_file is not None:
        keys = keys.merged(ApiKeys.from_file(settings.api_keys_file))
    return keys


async def main(settings: IngestSettings, stop: asyncio.Event) -> None:
    rules = load_rules(settings.rules)
    keys = load_keys(settings)
    health = Health()
    suppressions = SuppressionView(settings.kafka_common())
    suppressions.start()
    health.add_check("suppressions", lambda: suppressions.ready)
    producer = AsyncProducer(
        settings.producer_config() | {"delivery.timeout.ms": int(settings.produce_timeout_s * 1000)}
    )
    deps = IngestDeps(
        rules=rules,
        keys=keys,
        producer=producer,
        suppressions=suppressions,
        health=health,
        max_message_bytes=settings.max_message_bytes,
        produce_timeout_s=settings.produce_timeout_s,
        retry_after_s=settings.retry_after_s,
    )
    app = with_limits(create_app(deps), settings.max_message_bytes)
    submit_loop = consumer_loop(
        settings,
        name="submit",
        group_id=settings.group_id,
        topics=[SUBMIT],
        handler=SubmitHandler(rules, suppressions, settings.max_message_bytes),
        producer=producer,
        health=health,
    )
    try:
        await run_until_stopped(
            stop, serve_http(app, settings.http_addr, stop), submit_loop.run(stop)
        )
    finally:
        producer.close()
        suppressions.stop()


if __name__ == "__main__":
    run_service("ingest", IngestSettings(), main)
