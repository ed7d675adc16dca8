"""Liveness and readiness, shared by every service and served on `/healthz` and `/readyz`."""

import time
from collections.abc import Callable

LIVENESS_TIMEOUT_S = 30.0


class Health:
    """Loops `beat()` each time they poll; readiness is every registered check passing.

    Liveness proves the consumer loop still turns, not just that the HTTP thread answers.
    """

    def __init__(self) -> None:
        self._beats: dict[str, float] = {}
        self._checks: dict[str, Callable[[], bool]] = {}

    def beat(self, loop_name: str) -> None:
        self._beats[loop_name] = time.monotonic()

    def forget(self, loop_name: str) -> None:
        self._beats.pop(loop_name, None)

    def add_check(self, name: str, check: Callable[[], bool]) -> None:
        self._checks[name] = check

    def liveness(self) -> dict[str, bool]:
        now = time.monotonic()
        return {name: now - last < LIVENESS_TIMEOUT_S for name, last in self._beats.items()}

    def readiness(self) -> dict[str, bool]:
        status = {name: check() for name, check in self._checks.items()}
        status.update({f"loop:{name}": ok for name, ok in self.liveness().items()})
        return status

    def alive(self) -> bool:
        return all(self.liveness().values())

    def ready(self) -> bool:
        return bool(self._beats) and all(self.readiness().values())
