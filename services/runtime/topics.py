"""Create every topic of the catalogue (one outbound topic per pool); running twice is harmless.

Usage: python -m services.runtime.topics [--rules deploy/local/rules.yaml]
"""

import argparse
import logging
import sys
import time
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from schemas.catalogue import TOPIC_PREFIX, concrete_topics
from schemas.rules import load_rules
from services.runtime.settings import ServiceSettings

log = logging.getLogger(__name__)
CREATE_TIMEOUT_S = 30.0


def ensure_topics(
    admin: AdminClient, pools: list[str], replication_factor: int = 1, prefix: str = TOPIC_PREFIX
) -> list[str]:
    """Create the missing topics; returns the names created."""
    existing = set(admin.list_topics(timeout=CREATE_TIMEOUT_S).topics)
    wanted = [
        NewTopic(
            name,
            num_partitions=spec.partitions,
            replication_factor=replication_factor,
            config=spec.kafka_config(),
        )
        for name, spec in concrete_topics(pools, prefix)
        if name not in existing
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rules", type=Path, default=None)
    parser.add_argument("--replication-factor", type=int, default=1)
    args = parser.parse_args()
    settings = ServiceSettings()
    admin = AdminClient(settings.kafka_common())
    pools = load_rules(args.rules).pool_names()
    created = ensure_topics(admin, pools, args.replication_factor)
    total = len(concrete_topics(pools))
    print(f"topics: {len(created)} created, {total - len(created)} already there", file=sys.stderr)


if __name__ == "__main__":
    main()
