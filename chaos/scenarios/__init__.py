"""The scenarios of issue 10, by number. Each is a function `run(full) -> Verdict`: `full`
is the `make chaos` size, otherwise the shorter `make test` size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from chaos.oracle import Verdict


@dataclass(frozen=True)
class Scenario:
    number: int
    title: str
    #: One verdict, or one per phase (printed as rows 4a, 4b, ...).
    run: Callable[[bool], Verdict | list[Verdict]]
    #: Too slow for `make test` even when small: runs only in `make chaos`.
    chaos_only: bool = False


def all_scenarios() -> dict[int, Scenario]:
    from chaos.scenarios import brokers, fuzz, inputs, processes, protocol, slow, tls

    found: list[Scenario] = [
        *brokers.SCENARIOS,
        *processes.SCENARIOS,
        *protocol.SCENARIOS,
        *tls.SCENARIOS,
        *inputs.SCENARIOS,
        *slow.SCENARIOS,
        *fuzz.SCENARIOS,
    ]
    return {s.number: s for s in sorted(found, key=lambda s: s.number)}


def check_small(number: int) -> None:
    """Run scenario `number` at its `make test` size; fail with every check that failed."""
    import pytest

    from tests.support.kafka import BOOTSTRAP, broker_available

    if not broker_available(BOOTSTRAP):
        pytest.fail(f"no Kafka broker on {BOOTSTRAP}: run `make kafka-up` (make test does)")
    outcome = all_scenarios()[number].run(False)
    verdicts = outcome if isinstance(outcome, list) else [outcome]
    failed = [v for v in verdicts if not v.ok]
    assert not failed, "\n\n".join(v.summary() for v in failed)
