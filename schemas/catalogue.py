"""The topic catalogue: every topic described once. Topic creation, docs and tests read it."""

import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from pydantic import BaseModel

from schemas.records import (
    AcceptedMessage,
    ControlCommand,
    DeliveryBatch,
    DeliveryEvent,
    DestinationStats,
    IdempotencyRecord,
    LedgerEntry,
    Submission,
    Suppression,
)

EXAMPLES_DIR = Path(__file__).parent / "examples"
MAX_MESSAGE_BYTES = 20 * 1024 * 1024
_DAY_MS = 24 * 3600 * 1000

#: Delay tiers of `mail.retry.<delay>`, shortest first. A record waits in a tier at most the
#: tier's delay (the router passes a longer wait on to a shorter tier), so the records of a
#: tier come due in about the order they were written; `10s` carries holds for quota.
RETRY_TIERS: dict[str, timedelta] = {
    "10s": timedelta(seconds=10),
    "1m": timedelta(minutes=1),
    "10m": timedelta(minutes=10),
    "1h": timedelta(hours=1),
    "6h": timedelta(hours=6),
}


def tier_for(delay: timedelta) -> str:
    """The longest tier not longer than the delay (the shortest if the delay is shorter)."""
    chosen = next(iter(RETRY_TIERS))
    for name, tier_delay in RETRY_TIERS.items():
        if tier_delay <= delay:
            chosen = name
    return chosen


@dataclass(frozen=True)
class TopicSpec:
    name: str
    key: str
    value: type[BaseModel] | None
    partitions: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    compacted: bool = False
    retention_ms: int = 7 * _DAY_MS
    config: dict[str, str] = field(default_factory=dict)

    @property
    def example_name(self) -> str:
        return self.name.replace("<", "").replace(">", "")

    def kafka_config(self) -> dict[str, str]:
        config = {
            "cleanup.policy": "compact" if self.compacted else "delete",
            "max.message.bytes": str(MAX_MESSAGE_BYTES),
        }
        if not self.compacted:
            config["retention.ms"] = str(self.retention_ms)
        return config | self.config


#: Prepended to every topic name and consumer group (default none). Lets environments share
#: one Kafka cluster, and lets a test run keep to its own topics beside a developer's stack.
TOPIC_PREFIX = os.environ.get("MAILRAIL_TOPIC_PREFIX", "")

OUTBOUND_TEMPLATE = "mail.outbound.<pool>"
SUBMIT = TOPIC_PREFIX + "mail.submit"
ACCEPTED = TOPIC_PREFIX + "mail.accepted"
EVENTS = TOPIC_PREFIX + "mail.events"
SUPPRESSION = TOPIC_PREFIX + "mail.suppression"
CONTROL = TOPIC_PREFIX + "mail.control"
REJECTED = TOPIC_PREFIX + "mail.rejected"
IDEMPOTENCY = TOPIC_PREFIX + "mail.idempotency"
SOFT_BOUNCES = TOPIC_PREFIX + "mail.soft-bounces"
LEDGER = TOPIC_PREFIX + "mail.ledger"
STATS = TOPIC_PREFIX + "mail.stats"
#: How long `mail.soft-bounces` keeps its records: the longest soft-bounce window it can serve.
SOFT_BOUNCE_RETENTION = timedelta(days=30)
#: How long an Idempotency-Key is remembered (the contract), and how long Kafka keeps its record.
IDEMPOTENCY_WINDOW = timedelta(hours=24)
_IDEMPOTENCY_RETENTION_MS = 26 * 3600 * 1000


def outbound_topic(pool: str, prefix: str = TOPIC_PREFIX) -> str:
    return f"{prefix}mail.outbound.{pool}"


def retry_topic(tier: str, prefix: str = TOPIC_PREFIX) -> str:
    return f"{prefix}mail.retry.{tier}"


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(
        "mail.submit", "idempotency key or anything", Submission, 8, ("upstream",), ("ingest",)
    ),
    TopicSpec("mail.accepted", "message id", AcceptedMessage, 8, ("ingest",), ("router",)),
    TopicSpec(OUTBOUND_TEMPLATE, "throttle key", DeliveryBatch, 16, ("router",), ("sender",)),
    *(
        TopicSpec(
            retry_topic(tier, ""),
            "throttle key",
            DeliveryBatch,
            8,
            ("sender",),
            ("router",),
            retention_ms=4 * _DAY_MS,
        )
        for tier in RETRY_TIERS
    ),
    TopicSpec(
        "mail.events",
        "message id",
        DeliveryEvent,
        8,
        ("ingest", "router", "sender", "bounce"),
        ("bounce", "ingest"),
        retention_ms=30 * _DAY_MS,
    ),
    TopicSpec(
        "mail.suppression",
        "tenant/address",
        Suppression,
        8,
        ("bounce", "ingest"),
        ("ingest", "router"),
        compacted=True,
    ),
    TopicSpec(
        "mail.control",
        "scope",
        ControlCommand,
        1,
        ("operators",),
        ("sender", "router"),
        compacted=True,
    ),
    TopicSpec(
        "mail.idempotency",
        "tenant/idempotency key",
        IdempotencyRecord,
        8,
        ("ingest",),
        ("ingest",),
        compacted=True,
        # Compacted and deleted: a key's latest record is kept for at least the 24 h window.
        config={
            "cleanup.policy": "compact,delete",
            "retention.ms": str(_IDEMPOTENCY_RETENTION_MS),
            "segment.ms": str(3600 * 1000),
            # One clock for every replica's lease and window decisions: the broker's.
            "message.timestamp.type": "LogAppendTime",
        },
    ),
    # Soft bounces re-keyed by address, so one bounce-service member counts all of an
    # address's soft bounces (mail.events is keyed by message id); see services/bounce/soft.py.
    TopicSpec(
        "mail.soft-bounces",
        "tenant/address",
        DeliveryEvent,
        8,
        ("bounce",),
        ("bounce",),
        retention_ms=int(SOFT_BOUNCE_RETENTION.total_seconds() * 1000),
    ),
    # The delivery ledger: written right after each remote 2xx, read back by every sender
    # of the pool, so a batch read again after a crash skips recipients already delivered.
    # Keys are unique (nothing to compact): the newest records are what a sender reads back.
    TopicSpec(
        "mail.ledger",
        "pool/message id/recipient index",
        LedgerEntry,
        8,
        ("sender",),
        ("sender",),
        retention_ms=2 * _DAY_MS,
    ),
    # Each sender's periodic snapshot of the destinations it owns, read by `mailrail queues`
    # and ingest's status page; one record per pool/destination survives compaction.
    TopicSpec(
        "mail.stats",
        "pool/destination",
        DestinationStats,
        1,
        ("sender",),
        ("operators", "ingest"),
        compacted=True,
        config={"segment.ms": str(3600 * 1000), "min.cleanable.dirty.ratio": "0.1"},
    ),
    TopicSpec(
        "mail.rejected",
        "as received",
        None,
        4,
        ("ingest", "router", "sender", "bounce"),
        ("operators",),
        retention_ms=30 * _DAY_MS,
    ),
)


def concrete_topics(pools: list[str], prefix: str = TOPIC_PREFIX) -> list[tuple[str, TopicSpec]]:
    """Every topic to create: the outbound template expanded once per pool."""
    result: list[tuple[str, TopicSpec]] = []
    for spec in TOPICS:
        if spec.name == OUTBOUND_TEMPLATE:
            result.extend((outbound_topic(pool, prefix), spec) for pool in pools)
        else:
            result.append((prefix + spec.name, spec))
    return result
