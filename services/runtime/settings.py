"""Settings shared by every service: one frozen pydantic-settings class, prefix `MAILRAIL_`."""

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.catalogue import TOPIC_PREFIX

PRODUCER_QUEUE_KBYTES = 65536
CONSUMER_QUEUE_KBYTES = 32768
CONSUMER_FETCH_KBYTES = 16384


def split_host_port(value: str, default_port: int) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`, or a bare host) → (host, port)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, int(rest.lstrip(":") or default_port)
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, default_port
    return host, int(port)


class ServiceSettings(BaseSettings):
    """Read once at start. Subclassed per service for its own variables."""

    model_config = SettingsConfigDict(env_prefix="MAILRAIL_", frozen=True, extra="ignore")

    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_location: str | None = None
    admin_addr: str = "127.0.0.1:9090"
    rules: Path | None = None
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    #: How many records may be in flight (consumed, not yet committed) before partitions pause.
    max_in_flight: int = 2000
    commit_interval_s: float = 1.0
    drain_timeout_s: float = 60.0
    #: librdkafka's prefetch queue and largest fetch response per consumer loop (KiB).
    consumer_queue_kbytes: int = Field(default=CONSUMER_QUEUE_KBYTES, ge=1024)
    consumer_fetch_kbytes: int = Field(default=CONSUMER_FETCH_KBYTES, ge=1024)
    #: librdkafka's `debug` contexts (e.g. `eos,msg,broker`), logged at DEBUG; unset: none.
    librdkafka_debug: str | None = None

    def kafka_common(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap,
            "security.protocol": self.kafka_security_protocol,
            "client.id": self.service_name(),
            "logger": logging.getLogger("librdkafka"),
        }
        if self.kafka_sasl_mechanism:
            config["sasl.mechanism"] = self.kafka_sasl_mechanism
            config["sasl.username"] = self.kafka_sasl_username or ""
            password = self.kafka_sasl_password
            config["sasl.password"] = password.get_secret_value() if password else ""
        if self.kafka_ssl_ca_location:
            config["ssl.ca.location"] = self.kafka_ssl_ca_location
        if self.librdkafka_debug:
            config["debug"] = self.librdkafka_debug
        return config

    def producer_config(self) -> dict[str, Any]:
        """Idempotent producer, `acks=all`: a record acknowledged is a record kept."""
        return self.kafka_common() | {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "message.max.bytes": 20 * 1024 * 1024,
            "queue.buffering.max.kbytes": PRODUCER_QUEUE_KBYTES,
            # Longer than any leader election: a record that times out while a request is
            # in flight makes librdkafka bump its epoch and resend other partitions'
            # possibly stored batches as new records (twins). A consumer loop can wait;
            # ingest, which cannot, writes in transactions (runtime/transactional.py).
            "delivery.timeout.ms": 300_000,
        }

    def consumer_config(self, group_id: str) -> dict[str, Any]:
        """Auto-commit and auto-store off: offsets move only when the loop says so."""
        return self.kafka_common() | {
            "group.id": TOPIC_PREFIX + group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            # librdkafka's memory for this consumer: what it prefetches, and how much one
            # fetch response may carry (a record larger than either still comes through,
            # alone: KIP-74). Past the loop's in-flight limit, more buffering is only memory.
            "queued.max.messages.kbytes": self.consumer_queue_kbytes,
            "fetch.max.bytes": self.consumer_fetch_kbytes * 1024,
            "max.partition.fetch.bytes": self.consumer_fetch_kbytes * 1024,
            "session.timeout.ms": 30000,
            "max.poll.interval.ms": 300000,
            "partition.assignment.strategy": "cooperative-sticky",
        }

    def service_name(self) -> str:
        return "mailrail"
