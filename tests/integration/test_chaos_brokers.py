"""Chaos scenarios where Kafka itself fails, each on a private cluster of its own (chaos/cluster.py).

Scenario 2 starts three brokers and kills leaders five times: it runs in `make chaos` only
(set CHAOS_SLOW=1 to run it here too).
"""

import os

import pytest

from chaos.scenarios import check_small


def test_1_broker_outage_every_202_written_every_other_request_503() -> None:
    check_small(1)


@pytest.mark.skipif(
    os.environ.get("CHAOS_SLOW") != "1", reason="three brokers: runs in make chaos (CHAOS_SLOW=1)"
)
def test_2_leader_kill9_on_three_brokers_loses_and_duplicates_nothing() -> None:
    check_small(2)
