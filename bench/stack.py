"""The system under test: the receiving sink and the four services, as child processes.

Services start with `deploy.local.stack.ServiceProcess` and `isolated_env()` (no MAILRAIL_*
variable of the caller leaks in), point at the private broker, read `bench/rules.yaml`, and
log JSON to `bench/run/logs/<name>.log`. The sender relays everything to the sink
(`MAILRAIL_SMART_HOST`).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from bench.procs import Popen, Registry, free_port, stop_child, wait_for_port
from bench.sampler import Sampler
from deploy.local.stack import ServiceProcess, isolated_env

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "bench/rules.yaml"
SENDER_GROUP = "mailrail-sender-default"
READY_TIMEOUT_S = 90.0
SERVICE_STOP_TIMEOUT_S = 30.0
ASSIGN_TIMEOUT_S = 90.0


#: What a snapshot holds: every package the services and the sink import.
SNAPSHOT = (
    "services",
    "schemas",
    "deploy/__init__.py",
    "deploy/local/__init__.py",
    "deploy/local/sink.py",
    "deploy/local/stack.py",
)


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except OSError:
        return ""


def source_state() -> dict[str, Any]:
    """The commit the code comes from and what was uncommitted in it; taken with the
    snapshot, since the tree may move on while the bench runs."""
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "uncommitted_in_services_schemas": _git(
            "status", "--porcelain", "--", "services", "schemas"
        ).splitlines(),
    }


def snapshot_source(run_dir: Path) -> Path:
    """Copy the services' code as it is now (committed or not) to `run_dir/src`.

    Other people change services/ while a bench runs; every process of one run is started
    from this copy, so a service restarted halfway (scaling) runs the same code as the rest.
    """
    src = run_dir / "src"
    shutil.rmtree(src, ignore_errors=True)
    for item in SNAPSHOT:
        source, target = REPO / item, src / item
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    return src


@dataclass
class SnapshotProcess(ServiceProcess):
    """A `ServiceProcess` whose working directory (so whose code) is the snapshot."""

    cwd: Path = REPO

    def start(self) -> SnapshotProcess:
        output = None if self.log_path is None else self.log_path.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            cwd=self.cwd,
            env=self.env,
            stdout=output,
            stderr=output,
            stdin=subprocess.DEVNULL,
        )
        if output is not None:
            output.close()
        return self


class Sink:
    """`deploy/local/sink.py --quiet --stats-file`: counts what arrives, keeps nothing."""

    def __init__(self, run_dir: Path, registry: Registry, src: Path = REPO) -> None:
        self.src = src
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.stats_file = run_dir / "sink-stats.json"
        self.log = run_dir / "logs/sink.log"
        self.registry = registry
        self.popen: Popen | None = None

    def start(self) -> None:
        self.stats_file.unlink(missing_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        output = self.log.open("ab")
        self.popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deploy.local.sink",
                "--listen",
                self.address,
                "--quiet",
                "--stats-file",
                str(self.stats_file),
            ],
            cwd=self.src,
            stdout=output,
            stderr=output,
            stdin=subprocess.DEVNULL,
        )
        output.close()
        self.registry.add(self.popen.pid, "sink")
        wait_for_port(self.port, 30, self.popen)

    def stop(self) -> None:
        if self.popen is not None:
            stop_child(self.popen)
            self.registry.remove(self.popen.pid)
            self.popen = None


class Stack:
    def __init__(
        self,
        run_dir: Path,
        bootstrap: str,
        sink: Sink,
        sampler: Sampler,
        registry: Registry,
        src: Path = REPO,
    ) -> None:
        self.src = src
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        self.bootstrap = bootstrap
        self.sink = sink
        self.sampler = sampler
        self.registry = registry
        self.http_addr = f"127.0.0.1:{free_port()}"
        self.services: dict[str, ServiceProcess] = {}
        self.peak_rss_mib: dict[str, float] = {}

    @property
    def url(self) -> str:
        return f"http://{self.http_addr}"

    def _service(self, name: str, module: str, **extra: str) -> ServiceProcess:
        admin = extra.get("MAILRAIL_HTTP_ADDR") or f"127.0.0.1:{free_port()}"
        env = isolated_env(
            {
                "MAILRAIL_KAFKA_BOOTSTRAP": self.bootstrap,
                "MAILRAIL_RULES": str(RULES),
                "MAILRAIL_ADMIN_ADDR": admin,
                "MAILRAIL_LOG_FORMAT": "json",
                "MAILRAIL_DRAIN_TIMEOUT_S": "10",
                **extra,
            }
        )
        self.logs.mkdir(parents=True, exist_ok=True)
        return SnapshotProcess(
            name, module, env, f"http://{admin}", log_path=self.logs / f"{name}.log", cwd=self.src
        )

    def start(self, senders: int = 1) -> None:
        starting = [
            self._service(
                "ingest",
                "services.ingest",
                MAILRAIL_HTTP_ADDR=self.http_addr,
                MAILRAIL_API_KEYS="bench:bench-key",
                # The bench measures the pipeline, not the per-tenant admission limit.
                MAILRAIL_RATE_RECIPIENTS_PER_S="1000000",
                MAILRAIL_RATE_BURST_RECIPIENTS="10000000",
            ),
            self._service("router", "services.router"),
            # Its SMTP listener on a free port too: a bench must not collide with `make run`.
            self._service(
                "bounce", "services.bounce", MAILRAIL_BOUNCE_SMTP_ADDR=f"127.0.0.1:{free_port()}"
            ),
        ]
        for process in starting:
            self._launch(process)
        for process in starting:
            process.wait_ready(READY_TIMEOUT_S)
        self.set_senders(senders)

    def _launch(self, process: ServiceProcess) -> None:
        process.start()
        assert process.popen is not None
        self.services[process.name] = process
        self.registry.add(process.popen.pid, process.name)
        self.sampler.watch(process.name, process.popen.pid)

    def sender_names(self) -> list[str]:
        return sorted(n for n in self.services if n.startswith("sender-"))

    def set_senders(self, count: int) -> None:
        """Run exactly `count` sender processes, and wait until they share all partitions."""
        for name in self.sender_names():
            self.stop_service(name)
        started = []
        for number in range(1, count + 1):
            process = self._service(
                f"sender-{number}",
                "services.sender",
                MAILRAIL_POOL="default",
                MAILRAIL_SMART_HOST=self.sink.address,
            )
            self._launch(process)
            started.append(process)
        for process in started:
            process.wait_ready(READY_TIMEOUT_S)
        self.wait_assigned(count)

    def wait_assigned(self, members: int) -> None:
        """Until the sender group is stable with `members` members, each owning partitions."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        deadline = time.monotonic() + ASSIGN_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                group = admin.describe_consumer_groups([SENDER_GROUP])[SENDER_GROUP].result(10)
            except Exception as exc:  # the group may not exist yet
                log.debug("describe group: %s", exc)
            else:
                owned = [len(m.assignment.topic_partitions) for m in group.members]
                if len(owned) == members and all(owned) and str(group.state).endswith("STABLE"):
                    return
            time.sleep(0.5)
        raise TimeoutError(
            f"{members} senders did not share the partitions within {ASSIGN_TIMEOUT_S} s"
        )

    def stop_service(self, name: str) -> None:
        process = self.services.pop(name)
        self._note_rss(name)
        self.sampler.unwatch(name)
        process.stop(timeout_s=SERVICE_STOP_TIMEOUT_S)
        if process.popen is not None:
            self.registry.remove(process.popen.pid)

    def _note_rss(self, name: str) -> None:
        for sample in self.sampler.samples:
            if name in sample.rss_mib:
                self.peak_rss_mib[name] = max(
                    self.peak_rss_mib.get(name, 0.0), sample.rss_mib[name]
                )

    def pids(self) -> dict[str, int]:
        return {n: p.popen.pid for n, p in self.services.items() if p.popen is not None}

    def stop(self) -> None:
        for name in [*self.sender_names(), "ingest", "router", "bounce"]:
            if name in self.services:
                self.stop_service(name)

    def exited(self) -> list[str]:
        """Services that died on their own."""
        return [
            f"{n} (exit {p.popen.returncode})"
            for n, p in self.services.items()
            if p.popen is not None and p.popen.poll() is not None
        ]


def log_summary(logs: Path) -> dict[str, dict[str, object]]:
    """Per log file: how many warnings and errors, and the most frequent messages."""
    summary: dict[str, dict[str, object]] = {}
    for path in sorted(logs.glob("*.log")):
        levels: Counter[str] = Counter()
        messages: Counter[str] = Counter()
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                if "Traceback" in line or "Error" in line:
                    levels["unstructured-error"] += 1
                    messages[line[:160]] += 1
                continue
            if not isinstance(entry, dict):
                continue
            level = str(entry.get("level", "?"))
            if level in ("warning", "error", "critical"):
                levels[level] += 1
                messages[
                    f"{level}: {entry.get('msg', '')} {entry.get('error', '')}".strip()[:200]
                ] += 1
        if levels:
            summary[path.stem] = {
                "counts": dict(levels),
                "top": [f"{count}x {text}" for text, count in messages.most_common(5)],
            }
    return summary
