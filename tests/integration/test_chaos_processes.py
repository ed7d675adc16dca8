"""Chaos scenarios on the processes, at `make test` size (full size: `make chaos`).

Each starts its own stack (topic prefix, services, loopback SMTP sink) and judges it with the
oracle of chaos/oracle.py: every recipient ingest accepted reaches one final state, nothing
is lost, duplicates are within what the scenario allows.
"""

from chaos.scenarios import check_small


def test_3_sender_kill9_loses_nothing_and_ledger_stops_resends() -> None:
    check_small(3)


def test_4_crash_between_250_and_commit_duplicates_exactly_as_expected() -> None:
    check_small(4)


def test_5_exception_on_record_k_reprocesses_k_and_skips_nothing() -> None:
    check_small(5)


def test_6_rebalance_churn_duplicates_only_from_killed_members() -> None:
    check_small(6)


def test_8_router_ingest_bounce_kill9_loses_and_duplicates_nothing() -> None:
    check_small(8)


def test_20_sigterm_under_load_drains_every_service() -> None:
    check_small(20)
