"""The command line's Kafka: write one `mail.control` record, read compacted topics once."""

import logging
from datetime import datetime
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from schemas.catalogue import CONTROL
from schemas.records import ControlCommand, DestinationStats
from services.ops.views import controls_view, read_once, stats_view
from services.runtime.settings import ServiceSettings

WRITE_TIMEOUT_S = 15.0
READ_TIMEOUT_S = 30.0


class CliSettings(ServiceSettings):
    """The same `MAILRAIL_KAFKA_*` variables as the services (and `MAILRAIL_RULES`)."""

    log_level: str = "WARNING"

    def service_name(self) -> str:
        return "mailrail-cli"


class Kafka:
    def __init__(self, settings: CliSettings) -> None:
        logging.getLogger("librdkafka").setLevel(logging.ERROR)
        self._config: dict[str, Any] = settings.kafka_common()
        self._producer_config = settings.producer_config()

    def write_control(self, key: str, command: ControlCommand | None) -> None:
        """Write the command (or a tombstone) and wait until Kafka has it."""
        producer = Producer(self._producer_config)
        errors: list[KafkaError] = []

        def on_delivery(error: KafkaError | None, _: Message) -> None:
            if error is not None:
                errors.append(error)

        value = None if command is None else command.model_dump_json(exclude_none=True).encode()
        producer.produce(CONTROL, value, key.encode(), on_delivery=on_delivery)
        if producer.flush(WRITE_TIMEOUT_S) or errors:
            raise TimeoutError(
                f"Kafka did not take the record: {errors[0] if errors else 'timeout'}"
            )

    def controls(self) -> dict[str, ControlCommand]:
        return read_once(controls_view(self._config), READ_TIMEOUT_S)

    def stats(self) -> list[DestinationStats]:
        return list(read_once(stats_view(self._config), READ_TIMEOUT_S).values())


def in_force(commands: dict[str, ControlCommand], now: datetime) -> dict[str, ControlCommand]:
    return {key: c for key, c in commands.items() if c.expires_at is None or c.expires_at > now}
