"""The native-memory tuning every service applies at start."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from services.runtime.memory import trim_periodically


def test_arenas_are_bounded_unless_the_environment_says_otherwise() -> None:
    code = "from services.runtime.memory import bound_malloc_arenas as b; print(b())"
    bounded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert bounded.stdout.strip() == "True"  # glibc here
    env_wins = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"MALLOC_ARENA_MAX": "4", "PATH": "/usr/bin:/bin"},
    )
    assert env_wins.stdout.strip() == "False"


async def test_the_trimmer_stops_with_the_service() -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(trim_periodically(stop, interval_s=0.01))
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 1.0)
