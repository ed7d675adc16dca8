"""When a deferred recipient is tried again, and which retry tier carries it there."""

import random
from datetime import datetime, timedelta


def next_delay(attempt: int, schedule_s: list[float], jitter: float = 0.1) -> timedelta:
    """Delay after failed attempt number `attempt` (1-based): the schedule, then its last step."""
    base_s = schedule_s[min(attempt, len(schedule_s)) - 1]
    return timedelta(seconds=base_s * (1 + random.uniform(-jitter, jitter)))


def expired(accepted_at: datetime, now: datetime, delay: timedelta, max_age: timedelta) -> bool:
    """True when the next attempt would fall past the message's maximum age."""
    return now + delay > accepted_at + max_age
