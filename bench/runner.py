"""The bench's phases, in order, each bounded in count and time; everything started is stopped.

`make bench`: private broker + sink + services → warm-up → end-to-end maximum (closed loop)
→ latency at 50% and 80% of that maximum (open loop) → py-spy profile under load → scaling
with 1, 2, 4 senders → services and broker stopped → Postfix relaying to the same sink →
raw SMTP ceilings (`smtp-source` into the sink, and into `smtp-sink`).

`make bench-soak`: the same stack at 50% load for a fixed time, memory of every process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import analysis, consume_latency
from bench.analysis import Window, percentile, sustained_or_drain, time_window
from bench.events import EventCollector
from bench.kafka import PrivateBroker
from bench.load import PhaseLoad, Submitter, closed_loop, open_loop
from bench.postfix import PostfixInstance, SmtpSink, ensure_installed, smtp_source
from bench.procs import Registry
from bench.profile import Profiler
from bench.sampler import Sampler
from bench.stack import RULES, Sink, Stack, log_summary, snapshot_source, source_state

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
RUN_DIR = REPO / "bench/run"
SERVICES = ("ingest", "router", "bounce")
EVENTS_CATCH_UP_S = 15.0


@dataclass
class Options:
    messages: int = 100_000
    per_submission: int = 1000
    window: int = 10_000
    warmup: int = 2_000
    senders: int = 1
    latency_s: float = 60.0
    latency_per_submission: int = 10
    #: Closed-loop run with the latency phases' submission shape: their 100%.
    small_messages: int = 20_000
    latency_loads: tuple[float, ...] = (0.5, 0.8)
    profile_s: float = 30.0
    scaling: tuple[int, ...] = (1, 2, 4)
    scaling_messages: int = 30_000
    postfix: bool = True
    postfix_messages: int = 100_000
    raw_messages: int = 20_000
    soak_s: float = 0.0
    soak_rate: float | None = None
    soak_load: float = 0.5
    quick: bool = False


@dataclass
class Phase:
    name: str
    start_t: float
    end_t: float
    kind: str  # "max", "latency", "postfix", "raw", "soak", "warmup", "profile"


@dataclass
class RunData:
    """Everything the report needs: results plus the time series for the chart."""

    results: dict[str, Any] = field(default_factory=dict)
    phases: list[Phase] = field(default_factory=list)
    latencies: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    samples: list[Any] = field(default_factory=list)
    #: `stack.source_state()` as the code was snapshotted.
    source: dict[str, Any] = field(default_factory=dict)


class Bench:
    def __init__(self, options: Options) -> None:
        self.o = options
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        self.registry = Registry(RUN_DIR / "pids.json")
        leftovers = self.registry.end_leftovers()
        if leftovers:
            log.warning("ended leftovers of an earlier run: %s", ", ".join(leftovers))
        shutil.rmtree(RUN_DIR / "logs", ignore_errors=True)
        (RUN_DIR / "logs").mkdir(parents=True)
        self.src = snapshot_source(RUN_DIR)
        source = source_state()
        self.broker = PrivateBroker(RUN_DIR, self.registry)
        self.sink = Sink(RUN_DIR, self.registry, self.src)
        self.sampler = Sampler(self.sink.stats_file)
        self.stack: Stack | None = None
        self.events: EventCollector | None = None
        self.submitter: Submitter | None = None
        self.profiler = Profiler(RUN_DIR / "profiles", self.registry)
        self.postfix: PostfixInstance | None = None
        self.smtp_sink: SmtpSink | None = None
        self.data = RunData(source=source)
        self._phase_number = 0

    # -- lifecycle -------------------------------------------------------------------------

    def _start_stack(self) -> Stack:
        log.info("starting: private Kafka broker, sink, services")
        self.broker.start(RULES, self.src)
        assert self.broker.pid is not None
        self.sampler.watch("kafka", self.broker.pid)
        self.sink.start()
        assert self.sink.popen is not None
        self.sampler.watch("sink", self.sink.popen.pid)
        self.sampler.watch("bench", os.getpid())
        self.sampler.start()
        stack = self.stack = Stack(
            RUN_DIR, self.broker.bootstrap, self.sink, self.sampler, self.registry, self.src
        )
        stack.start(self.o.senders)
        self.events = EventCollector(self.broker.bootstrap)
        self.events.start()
        self.submitter = Submitter(self.broker.bootstrap, stack.url)
        return stack

    def _stop_ours(self) -> None:
        """Stop load generator, event reader, services and broker (the sink stays)."""
        if self.submitter is not None:
            self.submitter.close()
            self.submitter = None
        if self.events is not None:
            self.events.stop()
            self.events = None
        if self.stack is not None:
            self.stack.stop()
            self.data.results["service_logs"] = log_summary(RUN_DIR / "logs")
            self.data.results["rss_peak_mib"] = {
                k: round(v, 1) for k, v in self.stack.peak_rss_mib.items()
            }
            self.stack = None
        self.sampler.unwatch("kafka")
        self.broker.stop()

    def close(self) -> None:
        """Stop everything still running, whatever state the run is in."""
        steps: list[Callable[[], None]] = [
            self.profiler.stop,
            self._stop_ours,
            lambda: self.postfix.stop() if self.postfix else None,
            lambda: self.smtp_sink.stop() if self.smtp_sink else None,
            self.sink.stop,
            self.sampler.stop,
        ]
        for step in steps:
            try:
                step()
            except Exception:
                log.exception("cleanup step failed")
        self.data.samples = list(self.sampler.samples)

    # -- helpers ---------------------------------------------------------------------------

    def _next_phase(self) -> int:
        self._phase_number += 1
        return self._phase_number

    def _ours(self) -> list[str]:
        assert self.stack is not None
        return ["kafka", "sink", *SERVICES, *self.stack.sender_names()]

    def _wait(self, done: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if done():
                return True
            if self.stack is not None and (dead := self.stack.exited()):
                raise RuntimeError(f"service died: {', '.join(dead)}")
            time.sleep(0.2)
        return done()

    def _cpu_breakdown(self, window: Window, names: list[str]) -> dict[str, float]:
        used = window.cpu_s(names)
        return {k: round(1000 * v / window.delivered, 3) for k, v in sorted(used.items())}

    def _window_report(self, window: Window, names: list[str]) -> dict[str, Any]:
        every = window.cpu_s()
        watched_cores = sum(every.values()) / window.seconds
        return {
            "delivered_per_s": round(window.rate_per_s, 1),
            "cpu_ms_per_msg": round(window.cpu_ms_per_msg(names), 3),
            "cpu_ms_per_msg_by_process": self._cpu_breakdown(window, names),
            "messages_per_smtp_connection": round(
                window.delivered / max(1, window.last.connections - window.first.connections), 1
            ),
            "bytes_per_message": round(
                (window.last.bytes - window.first.bytes) / max(1, window.delivered)
            ),
            "window_s": round(window.seconds, 1),
            "window_messages": window.delivered,
            "machine_busy_cores": round(window.machine_busy_cores(), 2),
            "bench_process_cores": round(every.get("bench", 0.0) / window.seconds, 3),
            "other_processes_cores": round(window.machine_busy_cores() - watched_cores, 2),
        }

    # -- phases ----------------------------------------------------------------------------

    def warmup(self) -> None:
        assert self.submitter is not None and self.events is not None
        phase = self._next_phase()
        load = PhaseLoad(phase, per_submission=max(1, self.o.warmup // 2))
        start = time.time()
        asyncio.run(
            closed_loop(
                self.submitter,
                load,
                self.o.warmup,
                self.o.warmup,
                lambda: 0,
                time.monotonic() + 120,
            )
        )
        events = self.events
        if not self._wait(lambda: events.delivered_count(phase) >= load.accepted_recipients, 120):
            log.warning(
                "warm-up: only %d of %d delivered",
                events.delivered_count(phase),
                load.accepted_recipients,
            )
        self.data.phases.append(Phase("warm-up", start, time.time(), "warmup"))

    def max_phase(self, name: str, total: int, per_submission: int | None = None) -> dict[str, Any]:
        """Closed loop: the highest rate the pipeline sustains, and its CPU per message."""
        assert self.submitter is not None and self.events is not None
        log.info("%s: %d messages, closed loop (window %d)", name, total, self.o.window)
        phase = self._next_phase()
        self.sampler.wait_next()
        base = self.sampler.delivered()
        load = PhaseLoad(phase, per_submission or self.o.per_submission)
        bound_s = 120 + total / 50
        asyncio.run(
            closed_loop(
                self.submitter,
                load,
                total,
                self.o.window,
                lambda: self.sampler.delivered() - base,
                time.monotonic() + bound_s,
            )
        )
        self._wait(
            lambda: self.sampler.delivered() - base >= load.accepted_recipients,
            60 + self.o.window / 50,
        )
        self.sampler.wait_next()
        end = time.time()
        self.data.phases.append(Phase(name, load.started_t, end, "max"))
        result = self._phase_outcome(phase, load, base)
        window, drain = sustained_or_drain(
            self.sampler.samples, base, load.accepted_recipients, load.last_submit_t
        )
        if window is None:
            result["error"] = "too few samples for a sustained window"
            return result
        result |= self._window_report(window, self._ours()) | {"window_includes_drain": drain}
        log.info(
            "%s: %.0f delivered/s, %.2f CPU-ms/msg",
            name,
            window.rate_per_s,
            window.cpu_ms_per_msg(self._ours()),
        )
        return result

    def _phase_outcome(self, phase: int, load: PhaseLoad, base: int) -> dict[str, Any]:
        """Counts a phase ends with: submitted, received by the sink, final states, errors."""
        assert self.events is not None
        events = self.events
        self._wait(
            lambda: events.delivered_count(phase) >= load.accepted_recipients, EVENTS_CATCH_UP_S
        )
        snapshot = events.snapshot(phase)
        outcome: dict[str, Any] = {
            "submitted_recipients": load.accepted_recipients,
            "sink_received": self.sampler.delivered() - base,
            "delivered_events": len(snapshot.delivered),
            "duplicate_delivered_events": snapshot.duplicates,
            "event_types": dict(snapshot.types),
        }
        accept_ms: dict[str, list[float]] = {"kafka": [], "http": []}
        for path, scheduled_t, accepted_t in list(load.submissions.values()):
            if accepted_t is not None:
                accept_ms[path].append(1000 * (accepted_t - scheduled_t))
        outcome["accept_ms"] = {
            path: {
                "p50": round(percentile(values, 0.5), 1),
                "p99": round(percentile(values, 0.99), 1),
            }
            for path, values in accept_ms.items()
        }
        if load.errors:
            outcome["submit_errors"] = dict(load.errors)
        if snapshot.problems:
            outcome["problem_events"] = snapshot.problems
        return outcome

    def latency_phase(self, name: str, rate_per_s: float) -> dict[str, Any]:
        """Open loop at a fixed rate; accept → `delivered` event latency of every recipient."""
        assert self.submitter is not None and self.events is not None
        log.info("%s: %.0f msg/s for %.0f s, open loop", name, rate_per_s, self.o.latency_s)
        phase = self._next_phase()
        self.sampler.wait_next()
        base = self.sampler.delivered()
        load = PhaseLoad(phase, self.o.latency_per_submission)
        asyncio.run(open_loop(self.submitter, load, rate_per_s, self.o.latency_s))
        events = self.events
        self._wait(lambda: events.delivered_count(phase) >= load.accepted_recipients, 90)
        self.data.phases.append(Phase(name, load.started_t, time.time(), "latency"))
        result = self._phase_outcome(phase, load, base)
        snapshot = events.snapshot(phase)
        by_path: dict[str, list[float]] = {"kafka": [], "http": []}
        scheduled: list[float] = []
        series: list[tuple[float, float]] = []
        for (submission, _), delivered_t in snapshot.delivered.items():
            entry = load.submissions.get(submission)
            if entry is None:
                continue
            path, scheduled_t, accepted_t = entry
            if accepted_t is None:
                continue
            latency_ms = 1000 * (delivered_t - accepted_t)
            by_path[path].append(latency_ms)
            scheduled.append(1000 * (delivered_t - scheduled_t))
            series.append((delivered_t, latency_ms))
        every = by_path["kafka"] + by_path["http"]
        self.data.latencies[name] = sorted(series)
        result |= {
            "offered_per_s": round(rate_per_s, 1),
            "p50_ms": round(percentile(every, 0.50), 1),
            "p90_ms": round(percentile(every, 0.90), 1),
            "p99_ms": round(percentile(every, 0.99), 1),
            "max_ms": round(max(every), 1) if every else math.nan,
            "by_path": {
                path: {
                    "count": len(values),
                    "p50_ms": round(percentile(values, 0.5), 1),
                    "p99_ms": round(percentile(values, 0.99), 1),
                }
                for path, values in by_path.items()
            },
            "scheduled_to_250_p99_ms": round(percentile(scheduled, 0.99), 1),
            "late_submissions": load.late_submissions,
            "missing": load.accepted_recipients - len(snapshot.delivered),
        }
        settle_s = min(10.0, 0.2 * self.o.latency_s)
        window = time_window(self.sampler.samples, load.started_t + settle_s, load.last_submit_t)
        if window is not None:
            report = self._window_report(window, self._ours())
            result["achieved_per_s"] = report.pop("delivered_per_s")
            result |= report
        log.info("%s: p50 %.1f ms, p99 %.1f ms", name, result["p50_ms"], result["p99_ms"])
        return result

    def profile_phase(self, rate_hint: float) -> dict[str, Any]:
        """py-spy on the sender(s) and the router while the pipeline runs at its maximum."""
        assert self.stack is not None
        total = int(max(rate_hint, 100) * (self.o.profile_s + 10))
        pids = self.stack.pids()
        targets = {n: pids[n] for n in ["router", *self.stack.sender_names()] if n in pids}
        started = False
        load_result: dict[str, Any] = {}

        def begin() -> None:
            nonlocal started
            started = self.profiler.start(targets, self.o.profile_s)

        timer = threading.Timer(5.0, begin)
        timer.daemon = True
        timer.start()
        try:
            load_result = self.max_phase("profile", total)
        finally:
            timer.cancel()
        if not started:
            return {"error": "py-spy not available or not started"}
        profiles = self.profiler.finish(self.o.profile_s + 30)
        profiles["load_while_profiling"] = {
            k: load_result.get(k) for k in ("delivered_per_s", "cpu_ms_per_msg")
        }
        return profiles

    def scaling_phase(self) -> dict[str, Any]:
        assert self.stack is not None
        results: dict[str, Any] = {}
        for count in self.o.scaling:
            log.info("scaling: %d sender process(es)", count)
            self.stack.set_senders(count)
            result = self.max_phase(f"senders-{count}", self.o.scaling_messages)
            results[str(count)] = {
                k: result.get(k)
                for k in (
                    "delivered_per_s",
                    "cpu_ms_per_msg",
                    "cpu_ms_per_msg_by_process",
                    "machine_busy_cores",
                    "submitted_recipients",
                    "sink_received",
                )
            }
        return results

    def postfix_phase(self) -> dict[str, Any]:
        total = self.o.postfix_messages
        log.info("postfix: %d messages through a private Postfix to the same sink", total)
        ensure_installed()
        self.postfix = PostfixInstance(RUN_DIR, self.sink.port, self.registry)
        master = self.postfix.start()
        self.sampler.watch("postfix", master, tree=True)
        self.sampler.wait_next()
        base = self.sampler.delivered()
        start = time.time()
        source = smtp_source(self.postfix.port, total, timeout_s=120 + total / 50)
        injected_t = time.time()
        self._wait(lambda: self.sampler.delivered() - base >= total, 120 + total / 100)
        self.sampler.wait_next()
        self.data.phases.append(Phase("postfix", start, time.time(), "postfix"))
        names = ["postfix", "sink"]
        window, drain = sustained_or_drain(self.sampler.samples, base, total, injected_t)
        result: dict[str, Any] = {
            "messages": total,
            "sink_received": self.sampler.delivered() - base,
            "injection_s": round(source.seconds, 1),
            "injection_per_s": round(total / source.seconds, 1),
            "smtp_source_cpu_ms_per_msg": round(1000 * source.cpu_s / total, 3),
            "left_in_queue": self.postfix.queued(),
            "maillog": self.postfix.log_counts(),
        }
        if window is not None:
            result |= self._window_report(window, names) | {"window_includes_drain": drain}
        self.sampler.unwatch("postfix")
        self.postfix.stop()
        self.postfix = None
        return result

    def raw_phase(self) -> dict[str, Any]:
        total = self.o.raw_messages
        log.info("raw ceiling: smtp-source → sink, smtp-source → smtp-sink (%d messages)", total)
        self.sampler.wait_next()
        base = self.sampler.delivered()
        start = time.time()
        into_sink = smtp_source(self.sink.port, total, timeout_s=120 + total / 100)
        self.sampler.wait_next()
        self.sampler.wait_next()
        self.data.phases.append(Phase("raw: sink", start, time.time(), "raw"))
        received = self.sampler.delivered() - base
        window = time_window(self.sampler.samples, start, time.time())
        sink_cpu = window.cpu_s(["sink"]).get("sink", math.nan) if window else math.nan
        self.smtp_sink = SmtpSink(self.registry)
        self.smtp_sink.start()
        before = self.smtp_sink.cpu_s()
        into_smtp_sink = smtp_source(self.smtp_sink.port, total, timeout_s=120 + total / 100)
        smtp_sink_cpu = self.smtp_sink.cpu_s() - before
        self.smtp_sink.stop()
        self.smtp_sink = None
        return {
            "messages": total,
            "smtp_source_to_sink_per_s": round(received / into_sink.seconds, 1),
            "sink_cpu_ms_per_msg": round(1000 * sink_cpu / max(received, 1), 3),
            "smtp_source_to_smtp_sink_per_s": round(total / into_smtp_sink.seconds, 1),
            "smtp_sink_cpu_ms_per_msg": round(1000 * smtp_sink_cpu / total, 3),
            "command": "smtp-source -d -N -s 8 -l 5120",
        }

    # -- whole runs ------------------------------------------------------------------------

    def run(self) -> RunData:
        r = self.data.results
        try:
            self._start_stack()
            self.warmup()
            log.info("consume latency: what one consume stage adds at 100 records/s")
            r["consume_latency"] = consume_latency.measure(self.broker.bootstrap)
            e2e = self.max_phase("end-to-end", self.o.messages)
            r["end_to_end"] = e2e
            max_rate = float(e2e.get("delivered_per_s") or 0.0)
            if max_rate <= 0:
                raise RuntimeError("no sustained throughput measured: see bench/run/logs/")
            small = self.max_phase(
                f"maximum, {self.o.latency_per_submission} per submission",
                self.o.small_messages,
                self.o.latency_per_submission,
            )
            r["end_to_end_small_submissions"] = small
            small_rate = float(small.get("delivered_per_s") or 0.0) or max_rate
            r["latency"] = {}
            for share in self.o.latency_loads:
                name = f"latency at {round(100 * share)}%"
                r["latency"][f"{round(100 * share)}%"] = self.latency_phase(
                    name, share * small_rate
                )
            if self.o.profile_s > 0:
                r["profile"] = self.profile_phase(max_rate)
            if self.o.scaling:
                r["scaling"] = self.scaling_phase()
            assert self.stack is not None
            r["rss_mib_now"] = _latest_rss(self.sampler)
            self._stop_ours()
            if self.o.postfix:
                r["postfix"] = self.postfix_phase()
                r["raw_ceiling"] = self.raw_phase()
        finally:
            self.close()
        return self.data

    def soak(self) -> RunData:
        r = self.data.results
        try:
            self._start_stack()
            self.warmup()
            rate = self.o.soak_rate
            if rate is None:
                measured = self.max_phase(
                    f"maximum, {self.o.latency_per_submission} per submission",
                    self.o.small_messages,
                    self.o.latency_per_submission,
                )
                r["max_for_soak"] = measured
                rate = self.o.soak_load * float(measured.get("delivered_per_s") or 0.0)
            if rate <= 0:
                raise RuntimeError("no rate for the soak")
            saved = self.o.latency_s
            self.o.latency_s = self.o.soak_s
            soak_started = time.time()
            try:
                r["soak"] = self.latency_phase("soak", rate)
            finally:
                self.o.latency_s = saved
            r["soak"]["memory"] = memory_growth(self.sampler, soak_started, self.o.soak_s)
            r["soak"]["rate_per_s"] = round(rate, 1)
            self._stop_ours()
        finally:
            self.close()
        return self.data


def _latest_rss(sampler: Sampler) -> dict[str, float]:
    sample = sampler.latest()
    return {} if sample is None else {k: round(v, 1) for k, v in sample.rss_mib.items()}


def memory_growth(sampler: Sampler, start_t: float, duration_s: float) -> dict[str, Any]:
    """RSS of each process early in the soak (after a warm-up) against its end.

    The early value is the median over one minute (or a tenth of the soak) starting after
    the first tenth of the soak (at most two minutes); the late value the median over the
    same length at the end.
    """
    settle = min(120.0, duration_s / 10)
    span = min(60.0, duration_s / 10)
    end_t = start_t + duration_s
    early = [s for s in sampler.samples if start_t + settle <= s.t <= start_t + settle + span]
    late = [s for s in sampler.samples if end_t - span <= s.t <= end_t]
    growth: dict[str, Any] = {}
    names = set().union(*(s.rss_mib for s in early)) if early else set()
    for name in sorted(names):
        a = [s.rss_mib[name] for s in early if name in s.rss_mib]
        b = [s.rss_mib[name] for s in late if name in s.rss_mib]
        if a and b:
            first, last = analysis.percentile(a, 0.5), analysis.percentile(b, 0.5)
            growth[name] = {
                "early_mib": round(first, 1),
                "late_mib": round(last, 1),
                "growth_pct": round(100 * (last - first) / first, 1),
                "peak_mib": round(max(s.rss_mib.get(name, 0.0) for s in sampler.samples), 1),
            }
    return growth
