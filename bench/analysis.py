"""Pure arithmetic over samples, latencies and profiles: no processes, no I/O."""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.sampler import Sample

#: The sustained rate is measured between these fractions of a phase's messages: the ramp
#: before the first and the drain after the second are left out.
WINDOW_FROM = 0.10
WINDOW_TO = 0.90


@dataclass(frozen=True)
class Window:
    """What happened between two samples."""

    first: Sample
    last: Sample

    @property
    def seconds(self) -> float:
        return self.last.t - self.first.t

    @property
    def delivered(self) -> int:
        return self.last.delivered - self.first.delivered

    @property
    def rate_per_s(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else 0.0

    def cpu_s(self, names: Sequence[str] | None = None) -> dict[str, float]:
        """CPU seconds per process over the window (processes present, same pid, at both ends)."""
        used = {}
        for name, (pid, end) in self.last.cpu_s.items():
            start = self.first.cpu_s.get(name)
            if start is not None and start[0] == pid and (names is None or name in names):
                used[name] = end - start[1]
        return used

    def cpu_ms_per_msg(self, names: Sequence[str]) -> float:
        if self.delivered <= 0:
            return math.nan
        return 1000 * sum(self.cpu_s(names).values()) / self.delivered

    def machine_busy_cores(self) -> float:
        """Average busy cores of the whole machine (ours and anybody else's)."""
        return (self.last.busy_s - self.first.busy_s) / self.seconds if self.seconds > 0 else 0.0


def sustained_or_drain(
    samples: Sequence[Sample], base: int, expected: int, until_t: float
) -> tuple[Window | None, bool]:
    """The sustained window while load was still being submitted; when that covers less
    than a quarter of the messages (a short run), [10%, 90%] including the drain.
    Returns the window and whether it includes the drain."""
    window = sustained_window(samples, base, expected, until_t=until_t)
    if window is not None and window.delivered >= 0.25 * expected:
        return window, False
    return sustained_window(samples, base, expected), True


def sustained_window(
    samples: Sequence[Sample],
    base: int,
    expected: int,
    until_t: float | None = None,
    lo: float = WINDOW_FROM,
    hi: float = WINDOW_TO,
) -> Window | None:
    """The window from the sample where `lo` of `expected` had arrived to the one where `hi` had.

    `base` is the sink's count when the phase began; `until_t` ends the window earlier (when
    the load generator stopped submitting, so the drain is excluded).
    """
    first = last = None
    for sample in samples:
        done = sample.delivered - base
        if first is None and done >= lo * expected:
            first = sample
        if first is not None and (until_t is None or sample.t <= until_t):
            last = sample
        if done >= hi * expected:
            break
    if first is None or last is None or last.t - first.t < 1.0:
        return None
    return Window(first, last)


def time_window(samples: Sequence[Sample], start_t: float, end_t: float) -> Window | None:
    """The widest window of samples inside [start_t, end_t]."""
    inside = [s for s in samples if start_t <= s.t <= end_t]
    if len(inside) < 2:
        return None
    return Window(inside[0], inside[-1])


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of unsorted values (nan when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def rates_per_second(samples: Sequence[Sample]) -> list[tuple[float, float]]:
    """(time, delivered/s) between consecutive samples."""
    points = []
    for before, after in itertools.pairwise(samples):
        seconds = after.t - before.t
        if seconds > 0.2:
            points.append((after.t, (after.delivered - before.delivered) / seconds))
    return points


_REPO = Path(__file__).resolve().parents[1]
#: Innermost frames that are waits, not work: the event loop's epoll, and threads blocked in
#: librdkafka (consume, producer poll) or a thread pool's queue.
WAITS = (
    "EpollSelector.select ",
    "ConsumerLoop._call.<locals>.<lambda> ",
    "AsyncProducer._serve ",
    "SuppressionView._run ",
    "CompactedReader._run ",
    "_worker (concurrent/futures/thread.py)",
)
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*)\)$")


@dataclass(frozen=True)
class ProfileSummary:
    samples: int
    #: Share of samples whose innermost frame is a wait (epoll, librdkafka poll/consume):
    #: py-spy's --nonblocking mode cannot always tell a waiting thread from a busy one.
    idle_share: float
    top_self: list[tuple[str, float]]  # frame, share of samples
    top_total: list[tuple[str, float]]
    by_area: list[tuple[str, float]]


#: Where a frame's file lives says which part of the stack spent the time (first match wins).
AREAS: list[tuple[str, str]] = [
    ("services/sender/compose", "compose (email.message)"),
    ("email/", "stdlib email package"),
    ("pydantic", "pydantic (validate/serialise)"),
    ("confluent_kafka", "confluent-kafka client"),
    ("aiosmtplib", "aiosmtplib"),
    ("services/sender/pipelining", "aiosmtplib"),
    ("services/sender/smtp", "sender smtp"),
    ("prometheus_client", "metrics"),
    ("opentelemetry/sdk/metrics", "metrics"),
    ("services/runtime/telemetry_metrics", "metrics"),
    ("services/runtime/loop", "runtime loop"),
    ("services/runtime/producer", "runtime producer"),
    ("asyncio/", "asyncio event loop"),
    ("selectors", "asyncio event loop"),
    ("logging/", "logging"),
    ("json/", "json"),
    ("services/bounce", "bounce classify/VERP"),
    ("services/", "other mailrail code"),
    ("schemas/", "schemas"),
]


def area_of(file: str) -> str:
    for needle, area in AREAS:
        if needle in file:
            return area
    return "other"


def summarise_collapsed(lines: Sequence[str], top: int = 15) -> ProfileSummary:
    """py-spy's raw (collapsed) output: `frame;frame;...;leaf count` per line.

    Samples that end in a wait (`WAITS`) are counted apart (`idle_share`); the shares below
    are of the other, busy samples. Self time goes to the leaf frame; total time to every distinct frame on the stack;
    areas are charged by the innermost frame that belongs to a known area.
    """
    idle = 0
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    area_counts: Counter[str] = Counter()
    samples = 0
    for line in lines:
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        # py-spy puts the thread (and process) name first: "thread (0x…)" / "process 12:…".
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if any(marker in frames[-1] for marker in WAITS):
            idle += count
            continue
        samples += count
        self_counts[_short(frames[-1])] += count
        for frame in {_short(f) for f in frames if not _plumbing(f)}:
            total_counts[frame] += count
        area = "other"
        for frame in reversed(frames):
            match = _FRAME.match(frame)
            if match is not None and (found := area_of(match["file"])) != "other":
                area = found
                break
        area_counts[area] += count

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(v / samples, 4)) for k, v in counter.most_common(top)] if samples else []

    everything = samples + idle
    return ProfileSummary(
        samples,
        round(idle / everything, 4) if everything else 0.0,
        shares(self_counts),
        shares(total_counts),
        shares(area_counts),
    )


#: Frames on every stack (interpreter start, event loop, thread start): no information.
_PLUMBING = (
    "<frozen runpy>",
    "asyncio/runners.py",
    "asyncio/base_events.py",
    "asyncio/events.py",
    "threading.py",
    "concurrent/futures/thread.py",
    "services/runtime/service.py",
)


def _plumbing(frame: str) -> bool:
    return any(marker in frame for marker in _PLUMBING) or frame.startswith("<module> (")


def _short(frame: str) -> str:
    """`func (/long/path/to/site-packages/pkg/mod.py)` → `func (pkg/mod.py)`."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "lib/python3.11/", f"{_REPO}/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['func']} ({path})"
