"""Processes the bench starts, and what /proc says about them (CPU time, resident memory).

Every process the bench starts is registered in `bench/run/pids.json` (pid and the start time
the kernel gives it), so a bench that was killed outright can end its own leftovers the next
time it runs — by pid, after checking the start time, never by name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, alive: Popen | None = None) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"process {alive.args!r} exited with {alive.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


Popen = subprocess.Popen[bytes]


@dataclass(frozen=True)
class ProcStat:
    """One process's counters from /proc/<pid>/stat (CPU in clock ticks)."""

    pid: int
    ppid: int
    utime: int
    stime: int
    cutime: int
    cstime: int
    start_ticks: int
    rss_pages: int

    @property
    def own_ticks(self) -> int:
        return self.utime + self.stime

    @property
    def reaped_ticks(self) -> int:
        """CPU of children this process has waited for."""
        return self.cutime + self.cstime


def read_stat(pid: int) -> ProcStat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return ProcStat(
        pid=pid,
        ppid=int(fields[1]),
        utime=int(fields[11]),
        stime=int(fields[12]),
        cutime=int(fields[13]),
        cstime=int(fields[14]),
        start_ticks=int(fields[19]),
        rss_pages=int(fields[21]),
    )


def all_stats() -> list[ProcStat]:
    stats = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := read_stat(int(entry.name))) is not None:
            stats.append(stat)
    return stats


def descendants(root: int, stats: Sequence[ProcStat]) -> list[ProcStat]:
    """`root` and every process below it, from one snapshot of /proc."""
    children: dict[int, list[ProcStat]] = {}
    by_pid = {}
    for stat in stats:
        children.setdefault(stat.ppid, []).append(stat)
        by_pid[stat.pid] = stat
    if root not in by_pid:
        return []
    found, todo = [], [by_pid[root]]
    while todo:
        stat = todo.pop()
        found.append(stat)
        todo.extend(children.get(stat.pid, []))
    return found


def tree_cpu_s(stats: Iterable[ProcStat]) -> float:
    """CPU seconds of a process tree: every live member's own time plus what each reaped.

    A child's time moves into its parent's `cutime` when it is reaped, so the sum neither
    loses nor double-counts a short-lived child (Postfix recycles its daemons).
    """
    return sum(s.own_ticks + s.reaped_ticks for s in stats) / CLOCK_TICKS_PER_S


def rss_mib(pid: int) -> float | None:
    """Resident set size (VmRSS) in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def system_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in first[:8]]
    user, nice, system, idle, iowait, irq, softirq, steal = values
    busy = user + nice + system + irq + softirq + steal
    return busy / CLOCK_TICKS_PER_S, (busy + idle + iowait) / CLOCK_TICKS_PER_S


@dataclass
class Registry:
    """Every process this bench started, persisted so leftovers of a killed run can be ended."""

    path: Path
    entries: dict[int, dict[str, object]] = field(default_factory=dict)

    def add(self, pid: int, name: str) -> None:
        stat = read_stat(pid)
        self.entries[pid] = {"name": name, "start_ticks": stat.start_ticks if stat else -1}
        self._save()

    def remove(self, pid: int) -> None:
        self.entries.pop(pid, None)
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".part")
        partial.write_text(json.dumps({str(k): v for k, v in self.entries.items()}))
        partial.replace(self.path)

    def end_leftovers(self) -> list[str]:
        """End processes a previous, killed run left behind (same pid *and* start time)."""
        if not self.path.exists():
            return []
        try:
            previous = json.loads(self.path.read_text())
        except (OSError, ValueError):
            previous = {}
        ended = []
        for pid_text, entry in previous.items():
            stat = read_stat(int(pid_text))
            if stat is None or stat.start_ticks != entry.get("start_ticks"):
                continue
            log.warning("ending leftover %s (pid %s) of an earlier run", entry["name"], pid_text)
            stop_pid(int(pid_text), timeout_s=10)
            ended.append(str(entry["name"]))
        self.path.unlink(missing_ok=True)
        return ended


def stop_pid(pid: int, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Signal one process, wait for it to go, SIGKILL it if it outlives the timeout."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stat = read_stat(pid)
        if stat is None or _is_zombie(pid):
            return
        time.sleep(0.1)
    log.warning("pid %d still running after %.0f s: SIGKILL", pid, timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return raw[raw.rindex(")") + 2 :].startswith("Z")


def stop_child(popen: Popen, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM a child we started, wait, SIGKILL if needed; returns its exit status."""
    if popen.poll() is not None:
        return popen.returncode
    popen.terminate()
    try:
        return popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("%s still running after %.0f s: SIGKILL", popen.args, timeout_s)
        popen.kill()
        return popen.wait()
