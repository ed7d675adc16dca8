"""Create every topic of the catalogue (one outbound topic per pool); running twice is harmless.

Usage: python -m services.runtime.topics [--rules deploy/local/rules.yaml]
           [--replication-factor N] [--min-partitions N] [--grow-partitions]

`--min-partitions N` gives every topic that the catalogue (`schemas/catalogue.py`) sizes
smaller at least N partitions; topics already bigger keep their count. Production uses 16, the
count of `mail.outbound.<pool>`, so every consumer group can grow as far as the senders can and
no topic has more partitions than the senders' autoscaler (KEDA `maxReplicaCount`) assumes.

A topic that already exists is never changed by default. If it has fewer partitions than
wanted, the tool says so (one warning per topic) and leaves it. `--grow-partitions` adds the
missing ones: Kafka can add partitions but never remove them, and adding them changes which
partition a key hashes to, so for a while records of one key sit on two partitions. Per-key
order (a recipient's events, a throttle key's batches) and the rule that one sender owns a
destination's quota break until the records written before the change are consumed: grow
while the topic is drained, or accept the overlap.
"""

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    NewPartitions,
    NewTopic,
)

from schemas.catalogue import TOPIC_PREFIX, TopicSpec, concrete_topics
from schemas.rules import load_rules
from services.runtime.settings import ServiceSettings

log = logging.getLogger(__name__)
CREATE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class PlannedTopic:
    name: str
    spec: TopicSpec
    partitions: int


@dataclass(frozen=True)
class Shortfall:
    """An existing topic with fewer partitions than the plan wants."""

    topic: str
    has: int
    wants: int


def partitions_for(spec: TopicSpec, min_partitions: int = 1) -> int:
    """The catalogue's partition count, raised to `min_partitions`."""
    return max(spec.partitions, min_partitions)


def plan(
    pools: list[str], min_partitions: int = 1, prefix: str = TOPIC_PREFIX
) -> list[PlannedTopic]:
    """Every topic to have, with its partition count."""
    if min_partitions < 1:
        raise ValueError(f"min_partitions must be at least 1, not {min_partitions}")
    return [
        PlannedTopic(name, spec, partitions_for(spec, min_partitions))
        for name, spec in concrete_topics(pools, prefix)
    ]


def ensure_topics(
    admin: AdminClient,
    pools: list[str],
    replication_factor: int = 1,
    prefix: str = TOPIC_PREFIX,
    *,
    min_partitions: int = 1,
) -> list[str]:
    """Create the missing topics; returns the names created. Existing ones are left alone."""
    existing = set(admin.list_topics(timeout=CREATE_TIMEOUT_S).topics)
    wanted = [
        NewTopic(
            topic.name,
            num_partitions=topic.partitions,
            replication_factor=replication_factor,
            config=topic.spec.kafka_config(),
        )
        for topic in plan(pools, min_partitions, prefix)
        if topic.name not in existing
    ]
    if not wanted:
        return []
    created = []
    for name, future in admin.create_topics(wanted, request_timeout=CREATE_TIMEOUT_S).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    _wait_for_leaders(admin, created)
    return created


def shortfalls(
    admin: AdminClient, pools: list[str], prefix: str = TOPIC_PREFIX, *, min_partitions: int = 1
) -> list[Shortfall]:
    """Existing topics with fewer partitions than `plan` wants (missing topics are not listed)."""
    topics = admin.list_topics(timeout=CREATE_TIMEOUT_S).topics
    short = []
    for topic in plan(pools, min_partitions, prefix):
        metadata = topics.get(topic.name)
        if metadata is None or metadata.error is not None:
            continue
        has = len(metadata.partitions)
        if has < topic.partitions:
            short.append(Shortfall(topic.name, has, topic.partitions))
    return short


def grow_partitions(admin: AdminClient, short: list[Shortfall]) -> list[str]:
    """Add the missing partitions; returns the topics grown. Moves keys: see the module doc."""
    if not short:
        return []
    requests = [NewPartitions(s.topic, s.wants) for s in short]
    grown = []
    for name, future in admin.create_partitions(requests, request_timeout=CREATE_TIMEOUT_S).items():
        future.result()
        grown.append(name)
    _wait_for_leaders(admin, grown)
    return grown


def _wait_for_leaders(admin: AdminClient, names: list[str]) -> None:
    """A new topic answers requests only once each partition has a leader: wait for that."""
    deadline = time.monotonic() + CREATE_TIMEOUT_S
    while names and time.monotonic() < deadline:
        topics = admin.list_topics(timeout=CREATE_TIMEOUT_S).topics
        if all(
            name in topics
            and topics[name].error is None
            and topics[name].partitions
            and all(p.leader >= 0 for p in topics[name].partitions.values())
            for name in names
        ):
            return
        time.sleep(0.1)


def _at_least_one(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rules", type=Path, default=None)
    parser.add_argument("--replication-factor", type=_at_least_one, default=1)
    parser.add_argument(
        "--min-partitions",
        type=_at_least_one,
        default=1,
        metavar="N",
        help="give every topic at least N partitions (default 1: the catalogue's counts)",
    )
    parser.add_argument(
        "--grow-partitions",
        action="store_true",
        help="add partitions to existing topics that have fewer than wanted (moves keys)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    settings = ServiceSettings()
    admin = AdminClient(settings.kafka_common())
    pools = load_rules(args.rules).pool_names()
    created = ensure_topics(
        admin, pools, args.replication_factor, min_partitions=args.min_partitions
    )
    short = shortfalls(admin, pools, min_partitions=args.min_partitions)
    grown = grow_partitions(admin, short) if args.grow_partitions else []
    for s in short:
        if s.topic in grown:
            print(f"topics: {s.topic} grown from {s.has} to {s.wants} partitions", file=sys.stderr)
        else:
            print(
                f"topics: WARNING {s.topic} has {s.has} partitions, {s.wants} wanted; left as it"
                " is (--grow-partitions adds them, which moves keys to other partitions)",
                file=sys.stderr,
            )
    total = len(concrete_topics(pools))
    print(
        f"topics: {len(created)} created, {total - len(created)} already there,"
        f" {len(short) - len(grown)} with fewer partitions than wanted",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
