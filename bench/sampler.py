"""Samples, once a second, what the sink received and what every process has used.

The sink rewrites its stats file every second; the sampler notices each new version within
50 ms and reads every watched process's CPU time right then, so counters and CPU time of
one sample belong to the same instant (to within those 50 ms).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from bench.procs import all_stats, descendants, read_stat, rss_mib, system_cpu_s, tree_cpu_s

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05
MAX_SAMPLE_GAP_S = 1.5


@dataclass(frozen=True)
class Watched:
    """A process to account for. `tree`: count its descendants too (Postfix's daemons)."""

    pid: int
    tree: bool = False


@dataclass(frozen=True)
class Sample:
    t: float  # epoch seconds of the sink's counters
    delivered: int  # messages the sink has received since it started
    bytes: int
    connections: int  # SMTP connections the sink has accepted since it started
    cpu_s: dict[str, tuple[int, float]]  # name -> (pid, cumulative CPU seconds)
    rss_mib: dict[str, float]
    busy_s: float  # the whole machine's busy CPU seconds since boot
    total_s: float


@dataclass
class Sampler:
    stats_file: Path
    watched: dict[str, Watched] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def watch(self, name: str, pid: int, tree: bool = False) -> None:
        with self._lock:
            self.watched[name] = Watched(pid, tree)

    def unwatch(self, name: str) -> None:
        with self._lock:
            self.watched.pop(name, None)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def latest(self) -> Sample | None:
        with self._lock:
            return self.samples[-1] if self.samples else None

    def delivered(self) -> int:
        sample = self.latest()
        return 0 if sample is None else sample.delivered

    def wait_next(self, timeout_s: float = 3.0) -> Sample | None:
        """Block until a sample newer than the current one exists."""
        before = len(self.samples)
        deadline = time.monotonic() + timeout_s
        while len(self.samples) == before and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL_S)
        return self.latest()

    def _run(self) -> None:
        last_mtime = 0.0
        last_sample = 0.0
        while not self._stop.is_set():
            try:
                mtime = os.stat(self.stats_file).st_mtime
            except FileNotFoundError:
                mtime = 0.0
            now = time.monotonic()
            if mtime and (mtime != last_mtime or now - last_sample > MAX_SAMPLE_GAP_S):
                last_mtime, last_sample = mtime, now
                try:
                    self._take()
                except (OSError, ValueError) as exc:
                    log.debug("sample skipped: %s", exc)
            self._stop.wait(POLL_INTERVAL_S)

    def _take(self) -> None:
        counters = json.loads(self.stats_file.read_text())
        with self._lock:
            watched = dict(self.watched)
        cpu: dict[str, tuple[int, float]] = {}
        rss: dict[str, float] = {}
        snapshot = all_stats() if any(w.tree for w in watched.values()) else []
        for name, target in watched.items():
            if target.tree:
                members = descendants(target.pid, snapshot)
                if members:
                    cpu[name] = (target.pid, tree_cpu_s(members))
                    rss[name] = (
                        sum(m.rss_pages for m in members) * os.sysconf("SC_PAGE_SIZE") / 2**20
                    )
                continue
            stat = read_stat(target.pid)
            if stat is None:
                continue
            cpu[name] = (target.pid, stat.own_ticks / os.sysconf("SC_CLK_TCK"))
            if (mib := rss_mib(target.pid)) is not None:
                rss[name] = mib
        busy, total = system_cpu_s()
        sample = Sample(
            t=datetime.fromisoformat(counters["updated_at"]).timestamp(),
            delivered=int(counters["messages"]),
            bytes=int(counters["bytes"]),
            connections=int(counters.get("connections", 0)),
            cpu_s=cpu,
            rss_mib=rss,
            busy_s=busy,
            total_s=total,
        )
        with self._lock:
            self.samples.append(sample)
