"""Sender for one IP pool: `mail.outbound.<pool>` → SMTP → `mail.events` and `mail.retry.*`."""

import asyncio
from collections.abc import Sequence
from datetime import timedelta

from confluent_kafka import Message

from schemas.catalogue import CONTROL, outbound_topic
from schemas.records import DeliveryBatch
from schemas.rules import load_rules
from services.runtime.codec import decode
from services.runtime.controls import ControlView
from services.runtime.dns import MxResolver
from services.runtime.health import Health
from services.runtime.http import admin_app, serve_http
from services.runtime.loop import Output
from services.runtime.producer import AsyncProducer
from services.runtime.service import consumer_loop, run_service, run_until_stopped
from services.runtime.settings import split_host_port
from services.sender.blocklist import BlocklistWatch, WatchConfig, resolver_for
from services.sender.deliver import Deliverer, DeliveryPolicy
from services.sender.dkim import DkimSigner
from services.sender.dkim_keys import DkimKeyError, load_keyring
from services.sender.ledger import DeliveryLedger
from services.sender.settings import SenderSettings
from services.sender.smtp import SmtpOptions, SmtpPool
from services.sender.stats import DestinationTally, Snapshotter, StatsPublisher


def build_deliverer(settings: SenderSettings, controls: ControlView) -> tuple[Deliverer, SmtpPool]:
    rules = load_rules(settings.rules)
    if settings.pool not in rules.pool_names():
        raise SystemExit(f"MAILRAIL_POOL={settings.pool!r} is not a pool in the rules file")
    pool = rules.pool(settings.pool)
    smtp = SmtpPool(
        SmtpOptions(
            ehlo=pool.ehlo,
            source_addresses=tuple(pool.source_addresses),
            command_timeout_s=settings.smtp_timeout_s,
            idle_timeout_s=settings.smtp_idle_timeout_s,
        ),
        # No more sessions are in use than batches in progress: keeping that many idle
        # means a smart host (one address for every destination) is never reconnected to.
        max_idle_per_host=settings.max_in_flight,
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
        max_quota_wait_s=settings.max_quota_wait_s,
        max_batches_per_destination=settings.max_batches_per_destination,
        max_batches_in_progress=max(1, settings.max_in_flight * 3 // 4),
        busy_hold_s=settings.busy_hold_s,
        pause_recheck_s=settings.pause_recheck_s,
    )
    signer = build_signer(settings)
    return Deliverer(pool, rules, policy, smtp, resolver, controls.controls, signer=signer), smtp


def build_signer(settings: SenderSettings) -> DkimSigner | None:
    """The DKIM signer with every key read now; a bad key folder stops the start."""
    if settings.dkim_keys is None:
        if settings.dkim_required_tenants:
            raise SystemExit("MAILRAIL_DKIM_REQUIRED_TENANTS is set but MAILRAIL_DKIM_KEYS is not")
        return None
    try:
        keyring = load_keyring(settings.dkim_keys)
    except DkimKeyError as exc:
        raise SystemExit(f"MAILRAIL_DKIM_KEYS: {exc}") from None
    return DkimSigner(keyring, frozenset(settings.dkim_required_tenants))


def build_watch(settings: SenderSettings, producer: AsyncProducer) -> BlocklistWatch | None:
    """The DNSBL watch of this pool's source addresses, if zones are configured."""
    if not settings.dnsbl_zones:
        return None
    addresses = load_rules(settings.rules).pool(settings.pool).source_addresses
    if not addresses:
        raise SystemExit(f"MAILRAIL_DNSBL_ZONES: pool {settings.pool} has no source_addresses")

    async def publish(key: str, value: bytes | None) -> None:
        await producer.send(CONTROL, value, key)

    config = WatchConfig(
        pool=settings.pool,
        addresses=addresses,
        zones=settings.dnsbl_zones,
        interval_s=settings.dnsbl_interval_s,
        pause=settings.dnsbl_pause,
        destinations=settings.dnsbl_destinations,
        pause_s=settings.dnsbl_pause_s,
    )
    nameserver = split_host_port(settings.dns, 53) if settings.dns else None
    return BlocklistWatch(config, publish, resolver_for(nameserver))


async def main(settings: SenderSettings, stop: asyncio.Event) -> None:
    health = Health()
    controls = ControlView(settings.kafka_common())
    controls.start()
    health.add_check("controls", lambda: controls.ready)
    deliverer, smtp = build_deliverer(settings, controls)
    await asyncio.to_thread(controls.wait_ready, 30.0)
    producer = AsyncProducer(settings.producer_config())
    ledger = DeliveryLedger(settings.kafka_common(), settings.producer_config(), settings.pool)
    ledger.start()
    if not await asyncio.to_thread(ledger.wait_ready, 60.0):
        raise SystemExit("the delivery ledger (mail.ledger) could not be read: see the log")
    deliverer.ledger = ledger
    watch = build_watch(settings, producer)

    tally = DestinationTally()

    async def on_batch(message: Message) -> Sequence[Output]:
        batch = decode(DeliveryBatch, message)
        tally.before(batch, message.partition())
        outputs = await deliverer.deliver(batch)
        tally.after(batch, outputs)
        return outputs

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
            StatsPublisher(
                Snapshotter(settings.pool, tally, controls.controls, settings.stats_interval_s),
                deliverer.destinations.all,
                lambda: {key: loop.lag.get(key) for key in loop.assigned},
                lambda: smtp.open_connections,
                producer,
            ).run(stop),
            *([watch.run(stop)] if watch else []),
        )
    finally:
        await smtp.close()
        producer.close()
        ledger.stop()
        controls.stop()


if __name__ == "__main__":
    run_service("sender", SenderSettings(), main)
