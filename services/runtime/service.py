"""Process entry shared by every service: logging, signals, and the stop event.

SIGTERM/SIGINT only set the stop event; the service's loops see it, drain, commit and return.
A second signal exits at once.
"""

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from services.runtime import telemetry_metrics, tracing
from services.runtime.health import Health
from services.runtime.logs import configure_logging
from services.runtime.loop import ConsumerLoop, Handler
from services.runtime.memory import bound_malloc_arenas, trim_periodically
from services.runtime.producer import RecordProducer
from services.runtime.settings import ServiceSettings

log = logging.getLogger(__name__)
S = TypeVar("S", bound=ServiceSettings)


def run_service(
    name: str, settings: S, main: Callable[[S, asyncio.Event], Awaitable[None]]
) -> None:
    bound_malloc_arenas()  # before any Kafka client starts its threads
    configure_logging(
        name,
        settings.log_level,
        settings.log_format,
        librdkafka_debug=bool(settings.librdkafka_debug),
    )
    provider = tracing.configure(name)
    telemetry_metrics.configure(name)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("second signal, exiting now")
                sys.exit(1)
            log.info("stopping", extra={"signal": signal.Signals(signum).name})
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        trimmer = asyncio.create_task(trim_periodically(stop))
        try:
            await main(settings, stop)
        finally:
            trimmer.cancel()

    log.info("starting", extra={"service": name})
    try:
        asyncio.run(runner())
    except Exception:
        log.exception("fatal error, exiting without committing")
        tracing.shutdown(provider)
        sys.exit(2)
    tracing.shutdown(provider)
    log.info("stopped", extra={"service": name})


async def run_until_stopped(stop: asyncio.Event, *tasks: Awaitable[None]) -> None:
    """Run tasks together; when one fails, stop the others and re-raise."""
    running = [asyncio.ensure_future(t) for t in tasks]
    try:
        for finished in asyncio.as_completed(running):
            try:
                await finished
            except Exception:
                stop.set()
                raise
    finally:
        stop.set()
        await asyncio.gather(*running, return_exceptions=True)


def consumer_loop(
    settings: ServiceSettings,
    *,
    name: str,
    group_id: str,
    topics: Sequence[str],
    handler: Handler,
    producer: RecordProducer,
    health: Health,
    max_in_flight: int | None = None,
    drain_timeout_s: float | None = None,
) -> ConsumerLoop:
    """A consumer loop configured from the service's settings."""
    return ConsumerLoop(
        name=name,
        consumer_config=settings.consumer_config(group_id),
        topics=topics,
        handler=handler,
        producer=producer,
        health=health,
        max_in_flight=max_in_flight or settings.max_in_flight,
        commit_interval_s=settings.commit_interval_s,
        drain_timeout_s=settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s,
    )
