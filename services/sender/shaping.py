"""Per-destination traffic shaping: rate windows, adaptive concurrency, backoff and pauses.

All state is in-process and belongs to the sender that owns the destination's throttle key
(the router keys records by it, so one sender owns a key at a time). Time comes from an
injected monotonic clock so tests can drive it.
"""

import asyncio
import itertools
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum

from schemas.records import SmtpReply
from schemas.rules import Backoff, Shaping

Clock = Callable[[], float]
RATE_WINDOW_S = 10.0
#: The most a rate window lets go at once, in seconds of its pace (see RateLimiter).
BURST_S = 1.0
#: A destination whose batches take this long is slow: past the sender's shared budget of
#: batches in progress, its further batches wait in a delay topic instead of in memory.
SLOW_ATTEMPT_S = 1.0
ATTEMPT_SMOOTHING = 0.3


class RateLimiter:
    """GCRA over several windows (per second, minute, hour), each paced evenly.

    A window of `count` messages per `seconds` lets one message go every `seconds / count`,
    with a burst of at most `BURST_S` worth of them (never more than `count`): 600/min sends
    ten a second, not 600 in the first second and then nothing, so no sliding window of
    `seconds` holds more than `count` plus that burst. When the windows change (a backoff, an
    override, its end), pacing goes on from the last booked slot at the new rate instead of
    starting over with a fresh burst.

    `reserve(n)` books n send slots at the earliest times every window allows and returns
    them; a booked slot is spent whether or not it is used.
    """

    def __init__(self, windows: list[tuple[float, float]], clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._windows: list[tuple[float, float]] = []
        self._tat: list[float] = []
        self._last_slot: float | None = None
        self.set_windows(windows)

    def set_windows(self, windows: list[tuple[float, float]]) -> None:
        """(messages, seconds) pairs; an empty list means unlimited."""
        now = self._clock()
        self._windows = [(count, seconds) for count, seconds in windows if count > 0]
        last = self._last_slot
        self._tat = [
            now if last is None else max(now - _tolerance(c, s), last + s / c + _tolerance(c, s))
            for c, s in self._windows
        ]

    @property
    def limited(self) -> bool:
        return bool(self._windows)

    @property
    def rate_per_s(self) -> float | None:
        """The long-run rate the tightest window allows."""
        if not self._windows:
            return None
        return min(count / seconds for count, seconds in self._windows)

    def next_slot(self) -> float:
        """The earliest time one message could go (without booking it)."""
        earliest = self._clock()
        for (count, seconds), tat in zip(self._windows, self._tat, strict=True):
            earliest = max(earliest, tat - _tolerance(count, seconds))
        return earliest

    def reserve(self, n: int) -> list[float]:
        slots = []
        for _ in range(n):
            slot = self.next_slot()
            for index, (count, seconds) in enumerate(self._windows):
                self._tat[index] = max(self._tat[index], slot) + seconds / count
            slots.append(slot)
        if slots:
            self._last_slot = slots[-1]
        return slots


def _tolerance(count: float, seconds: float) -> float:
    """How far ahead of its even pace a window lets a message go: its burst allowance."""
    return max(0.0, min(seconds - seconds / count, BURST_S))


class AdaptiveLimit:
    """A semaphore whose limit can change while it is held."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._changed = asyncio.Condition()

    def set_limit_now(self, limit: int) -> None:
        """Lower the limit (no waiter can become eligible by that, so none is woken)."""
        self.limit = max(1, min(self.limit, limit))

    async def set_limit(self, limit: int) -> None:
        async with self._changed:
            self.limit = max(1, limit)
            self._changed.notify_all()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_use < self.limit)
            self.in_use += 1
        try:
            yield
        finally:
            async with self._changed:
                self.in_use -= 1
                self._changed.notify_all()


class Signal(StrEnum):
    NONE = "none"
    THROTTLE = "throttle"
    BLOCK = "block"


class ReplyPatterns:
    def __init__(self, backoff: Backoff) -> None:
        self._throttle = [re.compile(p, re.IGNORECASE) for p in backoff.throttle_patterns]
        self._block = [re.compile(p, re.IGNORECASE) for p in backoff.block_patterns]

    def signal(self, reply: SmtpReply) -> Signal:
        if reply.code < 400:
            return Signal.NONE
        text = f"{reply.enhanced or ''} {reply.text}".strip()
        if any(p.search(text) for p in self._block):
            return Signal.BLOCK
        if reply.code == 421 or any(p.search(text) for p in self._throttle):
            return Signal.THROTTLE
        return Signal.NONE


@dataclass
class BackoffState:
    """How far below its configured rate and concurrency a destination runs (1.0 = not at all)."""

    factor: float = 1.0
    successes: int = 0
    throttled: int = 0


class Destination:
    """One throttle key as this sender sees it."""

    def __init__(
        self, key: str, shaping: Shaping, backoff: Backoff, clock: Clock = time.monotonic
    ) -> None:
        self.key = key
        self.shaping = shaping
        self._backoff = backoff
        self._clock = clock
        self.limiter = RateLimiter(shaping.windows(), clock)
        self.concurrency = AdaptiveLimit(shaping.max_connections)
        self.state = BackoffState()
        #: Batches in progress, and when each began (by token).
        self.waiting = 0
        self._started: dict[int, float] = {}
        self._tokens = itertools.count()
        #: How long this destination's batches take, smoothed (seconds).
        self.attempt_s = 0.0
        #: When the batches this sender held for quota are all due back (monotonic): a new
        #: batch that has to wait queues behind them (see `Deliverer._book_slots`).
        self.held_horizon = 0.0
        self.override_per_s: float | None = None
        #: Measured send rate (messages/s over the last window): what a backoff cuts when no
        #: rate is configured.
        self._observed_per_s = 0.0
        self._window_start = clock()
        self._window_sends = 0
        self.last_used = clock()

    def begin(self) -> int:
        """A batch starts; returns the token to `end` it with."""
        token = next(self._tokens)
        self._started[token] = self._clock()
        self.waiting += 1
        return token

    def end(self, token: int) -> None:
        started = self._started.pop(token)
        self.waiting -= 1
        elapsed = self._clock() - started
        self.attempt_s += ATTEMPT_SMOOTHING * (elapsed - self.attempt_s)

    def slow(self) -> bool:
        """Whether its batches take long: on average, or one in progress already has."""
        if self.attempt_s >= SLOW_ATTEMPT_S:
            return True
        oldest = min(self._started.values(), default=None)
        return oldest is not None and self._clock() - oldest >= SLOW_ATTEMPT_S

    def effective_rate_per_s(self) -> float | None:
        return self.limiter.rate_per_s

    def note_send(self) -> None:
        now = self._clock()
        self._window_sends += 1
        elapsed = now - self._window_start
        if elapsed >= RATE_WINDOW_S:
            self._observed_per_s = self._window_sends / elapsed
            self._window_start, self._window_sends = now, 0
        self.last_used = now

    def observed_per_s(self) -> float:
        elapsed = self._clock() - self._window_start
        current = self._window_sends / elapsed if elapsed >= 1.0 else 0.0
        return max(self._observed_per_s, current)

    def set_override(self, per_s: float | None) -> None:
        if per_s != self.override_per_s:
            self.override_per_s = per_s
            self._apply()

    def throttle(self) -> None:
        """A 'slow down' reply: cut rate and concurrency by the backoff's factor."""
        self.state.successes = 0
        self.state.throttled += 1
        self.state.factor = max(self.state.factor * self._backoff.cut_factor, 1e-3)
        self._apply()
        self.concurrency.set_limit_now(self._concurrency())

    async def on_signal(self, signal: Signal) -> None:
        """The signal of one transaction's reply: a throttle cuts, a success counts to recovery."""
        backoff = self._backoff
        if signal is Signal.THROTTLE:
            self.throttle()
        elif signal is Signal.NONE and self.state.factor < 1.0:
            self.state.successes += 1
            if self.state.successes >= backoff.recover_after:
                self.state.successes = 0
                self.state.factor = min(1.0, self.state.factor * backoff.recover_factor)
                self._apply()
                await self.concurrency.set_limit(self._concurrency())

    def _concurrency(self) -> int:
        return max(1, round(self.shaping.max_connections * self.state.factor))

    def _apply(self) -> None:
        """Recompute the rate windows from the configured rules, override and backoff."""
        windows = self.shaping.windows()
        if self.override_per_s is not None:
            windows = [(self.override_per_s, 1.0)]
        factor = self.state.factor
        if factor < 1.0:
            if not windows:
                base = max(self.observed_per_s(), self._backoff.min_rate_per_s)
                windows = [(base, 1.0)]
            floor = self._backoff.min_rate_per_s
            windows = [
                (max(count * factor, floor * seconds), seconds) for count, seconds in windows
            ]
        self.limiter.set_windows(windows)


class Destinations:
    """Destinations by throttle key, created on first use and forgotten when idle."""

    IDLE_S = 600.0

    def __init__(
        self,
        shaping_for: Callable[[str], Shaping],
        backoff: Backoff,
        clock: Clock = time.monotonic,
    ) -> None:
        self._shaping_for = shaping_for
        self._backoff = backoff
        self._clock = clock
        self._by_key: dict[str, Destination] = {}

    def get(self, key: str) -> Destination:
        destination = self._by_key.get(key)
        if destination is None:
            destination = Destination(key, self._shaping_for(key), self._backoff, self._clock)
            self._by_key[key] = destination
            self._forget_idle()
        destination.last_used = self._clock()
        return destination

    def all(self) -> list[Destination]:
        return list(self._by_key.values())

    def _forget_idle(self) -> None:
        cutoff = self._clock() - self.IDLE_S
        for key, destination in list(self._by_key.items()):
            if (
                destination.last_used < cutoff
                and destination.waiting == 0
                and destination.state.factor >= 1.0
            ):
                del self._by_key[key]
