"""Router: `mail.accepted` and the retry tiers → `mail.outbound.<pool>`.

One consumer loop for accepted mail and one per retry tier, so a tier full of batches that are
not yet due never holds back fresh mail or a shorter tier. A batch a sender held for a pause
waits until it is due *or* the pause is lifted (or a MOVE or PURGE takes it over): the router
follows `mail.control` and re-checks its waiting batches on every change, so a resume
releases held mail within a second instead of at the next re-check.
"""

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from schemas.addresses import domain_of
from schemas.catalogue import ACCEPTED, RETRY_TIERS, outbound_topic, retry_topic, tier_for
from schemas.records import AcceptedMessage, DeliveryBatch, utc_now
from schemas.rules import Rules, load_rules
from services.router.route import recheck, route
from services.router.settings import RouterSettings
from services.runtime.codec import batch_output, decode, event_output
from services.runtime.controls import Controls, ControlView
from services.runtime.dns import MxResolver
from services.runtime.health import Health
from services.runtime.http import admin_app, serve_http
from services.runtime.loop import BadRecord, Handler, Output
from services.runtime.producer import AsyncProducer
from services.runtime.service import consumer_loop, run_service, run_until_stopped
from services.runtime.settings import split_host_port
from services.runtime.suppression import SuppressionView

#: A batch due later than this when its tier's wait is over goes on to another tier.
CASCADE_SLACK = timedelta(seconds=1)


class Router:
    def __init__(
        self,
        rules: Rules,
        suppressions: SuppressionView,
        resolver: MxResolver | None,
        controls: Controls | None = None,
    ) -> None:
        self._rules = rules
        self._suppressions = suppressions
        self._resolver = resolver
        self._controls = controls
        self._changed = asyncio.Event()

    def controls_changed(self) -> None:
        """Wake every batch waiting on a pause (call on the event loop's thread)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _mx_keys(self, accepted: AcceptedMessage) -> dict[str, str]:
        """Throttle keys of provider groups matched by MX host (cached for the answers' TTL)."""
        if self._resolver is None:
            return {}
        keys = {}
        for domain in {domain_of(r.email) for r in accepted.recipients if not r.suppressed}:
            route_ = await self._resolver.resolve(domain)
            keys[domain] = self._rules.throttle_key(domain, [h.name for h in route_.hosts])
        return keys

    async def on_accepted(self, message: Message) -> Sequence[Output]:
        accepted = decode(AcceptedMessage, message)
        if accepted.pool not in self._rules.pool_names():
            raise BadRecord(f"unknown pool {accepted.pool!r}", "unknown_pool", "pool")
        batches, events = route(
            accepted, self._rules, self._suppressions.is_suppressed, await self._mx_keys(accepted)
        )
        topic = outbound_topic(accepted.pool)
        return [*(batch_output(topic, b) for b in batches), *map(event_output, events)]

    def retry_handler(self, tier: str) -> Handler:
        """The handler of one retry tier's loop."""
        tier_delay = RETRY_TIERS[tier]

        async def on_retry(message: Message) -> Sequence[Output]:
            return await self.on_retry(message, tier_delay)

        return on_retry

    async def on_retry(self, message: Message, tier_delay: timedelta) -> Sequence[Output]:
        """A batch from a retry tier: wait until it is due, but in this tier no longer than
        the tier's delay after it was written; a batch due later than that goes on to the
        tier of its remaining wait, so no record sits long in front of records due sooner."""
        batch = decode(DeliveryBatch, message)
        written = _written_at(message)
        release = batch.not_before
        if written is not None and (release is None or release > written + tier_delay):
            release = written + tier_delay
        if batch.held_for == "paused" and self._controls is not None:
            await self._wait_while_held(batch, release)
        else:
            await _sleep_until(release)
        if batch.not_before is not None:
            remaining = batch.not_before - utc_now()
            if remaining > CASCADE_SLACK and (
                batch.held_for != "paused" or self._still_held(batch)
            ):
                return [batch_output(retry_topic(tier_for(remaining)), batch)]
        live, events = recheck(batch, self._suppressions.is_suppressed)
        outputs = [event_output(e) for e in events]
        if live is not None:
            outputs.append(batch_output(outbound_topic(live.pool), live))
        return outputs

    def _still_held(self, batch: DeliveryBatch) -> bool:
        return self._controls is not None and self._controls.still_held(batch)

    async def _wait_while_held(self, batch: DeliveryBatch, until: datetime | None) -> None:
        while self._still_held(batch):
            delay_s = 0.0 if until is None else (until - utc_now()).total_seconds()
            if delay_s <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), delay_s)


def _written_at(message: Message) -> datetime | None:
    kind, ms = message.timestamp()
    if kind == TIMESTAMP_NOT_AVAILABLE or ms <= 0:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC)


async def _sleep_until(due: datetime | None) -> None:
    if due is not None:
        delay_s = (due - utc_now()).total_seconds()
        if delay_s > 0:
            await asyncio.sleep(delay_s)


async def main(settings: RouterSettings, stop: asyncio.Event) -> None:
    rules = load_rules(settings.rules)
    health = Health()
    suppressions = SuppressionView(settings.kafka_common())
    suppressions.start()
    health.add_check("suppressions", lambda: suppressions.ready)
    resolver = None
    if rules.needs_mx:
        resolver = MxResolver(split_host_port(settings.dns, 53) if settings.dns else None)
    controls = ControlView(settings.kafka_common())
    router = Router(rules, suppressions, resolver, controls.controls)
    loop = asyncio.get_running_loop()
    controls.on_change = lambda: loop.call_soon_threadsafe(router.controls_changed)
    controls.start()
    health.add_check("controls", lambda: controls.ready)
    await asyncio.to_thread(suppressions.wait_ready, 60.0)
    await asyncio.to_thread(controls.wait_ready, 30.0)
    producer = AsyncProducer(settings.producer_config())
    loops = [
        consumer_loop(
            settings,
            name="accepted",
            group_id=settings.group_id,
            topics=[ACCEPTED],
            handler=router.on_accepted,
            producer=producer,
            health=health,
        ),
        *(
            consumer_loop(
                settings,
                name=f"retry-{tier}",
                group_id=f"{settings.group_id}-retry-{tier}",
                topics=[retry_topic(tier)],
                handler=router.retry_handler(tier),
                producer=producer,
                health=health,
                max_in_flight=settings.retry_max_in_flight,
                # Batches not yet due are dropped on shutdown, not waited for: they are re-read.
                drain_timeout_s=1.0,
            )
            for tier in RETRY_TIERS
        ),
    ]
    try:
        await run_until_stopped(
            stop,
            serve_http(admin_app(health), settings.admin_addr, stop),
            *(loop.run(stop) for loop in loops),
        )
    finally:
        producer.close()
        suppressions.stop()
        controls.stop()


if __name__ == "__main__":
    run_service("router", RouterSettings(), main)
