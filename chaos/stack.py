"""One scenario's pipeline: its own topics, the services as child processes, and their logs.

Every stack has a fresh topic prefix (`chaos-<scenario>-<random>.`), so its topics and consumer
groups are its own: scenarios never see each other's records, nor a developer's `make run`.
`ChaosStack` is a context manager; leaving it stops every process it started (SIGTERM, then
SIGKILL) and deletes its topics, whatever happened inside.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from confluent_kafka.admin import AdminClient

from deploy.local.stack import ServiceProcess, isolated_env
from schemas.catalogue import concrete_topics
from services.runtime.topics import ensure_topics

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
RUN_DIR = REPO / "chaos" / "run"
DEFAULT_BOOTSTRAP = os.environ.get("CHAOS_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
API_KEY = "chaos-key-acme"
OTHER_KEY = "chaos-key-globex"
TENANT = "acme"
OTHER_TENANT = "globex"
VERP_KEY = "chaos-verp-key-0001"
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 60.0
TOPIC_DELETE_TIMEOUT_S = 30.0
#: Lines a process writes when a test hook ends it (chaos/member.py, services/sender/ledger.py).
CRASH_LINE = re.compile(r"(?:CHAOS|MAILRAIL-TEST)-CRASH (?P<fields>.*)")

#: Every scenario's services run with short retries and a short maximum age unless it says
#: otherwise, so that deferred mail reaches a final state within the scenario's time.
COMMON_ENV = {
    "MAILRAIL_RETRY_SCHEDULE_S": "[1, 2, 2]",
    "MAILRAIL_MAX_AGE_S": "90",
    "MAILRAIL_COMMIT_INTERVAL_S": "0.5",
    "MAILRAIL_DRAIN_TIMEOUT_S": "20",
    "MAILRAIL_PAUSE_RECHECK_S": "2",
    "MAILRAIL_BUSY_HOLD_S": "1",
    "MAILRAIL_VERP_KEY": VERP_KEY,
    "MAILRAIL_LOG_FORMAT": "json",
}
if kafka_debug := os.environ.get("CHAOS_KAFKA_DEBUG"):
    COMMON_ENV["MAILRAIL_LIBRDKAFKA_DEBUG"] = kafka_debug

BASE_RULES: dict[str, Any] = {
    "default_pool": "default",
    "bounce_domain": "bounces.chaos.test",
    "pools": [{"name": "default", "ehlo": "sender.chaos.test"}],
    "defaults": {
        "max_connections": 4,
        "max_messages_per_connection": 1000,
        "max_recipients_per_batch": 20,
    },
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def member_address(index: int) -> str:
    """The loopback address sender member `index` sends from: the sinks tell members apart by it."""
    return f"127.0.0.{100 + index}"


@dataclass
class Member:
    """One service process of the stack, and how it ended (for attributing duplicates)."""

    name: str
    process: ServiceProcess
    address: str | None = None
    starts: int = 0
    #: How each of its lives ended: "sigterm", "sigkill", "exit <code>".
    ends: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        popen = self.process.popen
        return popen is not None and popen.poll() is None


class ChaosStack:
    """The services of one scenario on the broker at `bootstrap`, under a fresh topic prefix."""

    def __init__(
        self,
        scenario: str,
        *,
        bootstrap: str = DEFAULT_BOOTSTRAP,
        rules: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        replication_factor: int = 1,
    ) -> None:
        self.scenario = scenario
        self.bootstrap = bootstrap
        self.prefix = f"chaos-{scenario}-{uuid.uuid4().hex[:8]}."
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.dir = RUN_DIR / f"{stamp}-{scenario}-{self.prefix.split('-')[-1].rstrip('.')}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rules: dict[str, Any] = dict(rules or BASE_RULES)
        self.rules_path = self.write_rules(self.rules, "rules.yaml")
        self.pools = [pool["name"] for pool in self.rules["pools"]]
        self.env = {
            **COMMON_ENV,
            "MAILRAIL_KAFKA_BOOTSTRAP": bootstrap,
            "MAILRAIL_TOPIC_PREFIX": self.prefix,
            "MAILRAIL_RULES": str(self.rules_path),
            **(env or {}),
        }
        self.replication_factor = replication_factor
        self.members: dict[str, Member] = {}
        self.http_addr = f"127.0.0.1:{free_port()}"
        self.admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
        self._topics_created = False

    # -- topics ------------------------------------------------------------------------

    def topic(self, name: str) -> str:
        return self.prefix + name

    def create_topics(self) -> None:
        ensure_topics(self.admin, self.pools, self.replication_factor, prefix=self.prefix)
        self._topics_created = True

    def delete_topics(self) -> None:
        if not self._topics_created:
            return
        names = [name for name, _ in concrete_topics(self.pools, self.prefix)]
        existing = set(self.admin.list_topics(timeout=10).topics)
        doomed = [n for n in names if n in existing]
        if doomed:
            for future in self.admin.delete_topics(
                doomed, operation_timeout=TOPIC_DELETE_TIMEOUT_S
            ).values():
                with contextlib.suppress(Exception):
                    future.result()
        self._topics_created = False

    # -- processes ----------------------------------------------------------------------

    def write_rules(self, rules: Mapping[str, Any], name: str) -> Path:
        path = self.dir / name
        path.write_text(yaml.safe_dump(dict(rules), sort_keys=False))
        return path

    def _add(
        self,
        name: str,
        module: str,
        extra: Mapping[str, str],
        *,
        http: str | None = None,
        address: str | None = None,
    ) -> Member:
        """A member; one with CHAOS_* variables runs through chaos/member.py's hooks."""
        admin = http or f"127.0.0.1:{free_port()}"
        env = isolated_env({**self.env, "MAILRAIL_ADMIN_ADDR": admin, **extra})
        args = []
        if any(key.startswith("CHAOS_") for key in extra):
            module, args = "chaos.member", [module]
        process = ServiceProcess(
            name, module, env, f"http://{admin}", args=args, log_path=self.dir / f"{name}.log"
        )
        member = Member(name, process, address)
        self.members[name] = member
        return member

    def add_ingest(self, name: str = "ingest", **extra: str) -> Member:
        env = {
            "MAILRAIL_HTTP_ADDR": self.http_addr,
            "MAILRAIL_API_KEYS": f"{TENANT}:{API_KEY},{OTHER_TENANT}:{OTHER_KEY}",
            **extra,
        }
        return self._add(name, "services.ingest", env, http=self.http_addr)

    def add_router(self, name: str = "router", **extra: str) -> Member:
        return self._add(name, "services.router", extra)

    def add_bounce(self, name: str = "bounce", **extra: str) -> Member:
        extra.setdefault("MAILRAIL_BOUNCE_SMTP_ADDR", f"127.0.0.1:{free_port()}")
        return self._add(name, "services.bounce", extra)

    def add_sender(
        self,
        name: str,
        pool: str = "default",
        *,
        index: int | None = None,
        static: bool = False,
        **extra: str,
    ) -> Member:
        """A sender of `pool`. With `index`, it sends from its own loopback address (its own
        rules file, the pool's `source_addresses` set to that address), so the sinks can tell
        which member sent each message. `static` runs it through chaos/member.py with a
        static group membership (`group.instance.id` = the name)."""
        env = {"MAILRAIL_POOL": pool, **extra}
        address = None
        if index is not None:
            address = member_address(index)
            rules = dict(self.rules)
            rules["pools"] = [
                {**p, "source_addresses": [address]} if p["name"] == pool else p
                for p in self.rules["pools"]
            ]
            env["MAILRAIL_RULES"] = str(self.write_rules(rules, f"rules-{name}.yaml"))
        if static:
            env["CHAOS_GROUP_INSTANCE_ID"] = f"{self.prefix}{name}"
        return self._add(name, "services.sender", env, address=address)

    def set_env(self, name: str, **env: str | None) -> None:
        """Change a member's environment for its next start (None removes a variable)."""
        target = self.members[name].process.env
        for key, value in env.items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value

    def start(self, *names: str, wait: bool = True) -> None:
        """Start the named members (all when none is named) and wait until each is ready."""
        chosen = [self.members[n] for n in names] if names else list(self.members.values())
        for member in chosen:
            if not member.running:
                member.process.start()
                member.starts += 1
        if wait:
            for member in chosen:
                member.process.wait_ready(READY_TIMEOUT_S)

    def kill(self, name: str) -> None:
        """SIGKILL the member and reap it."""
        member = self.members[name]
        popen = member.process.popen
        if popen is not None and popen.poll() is None:
            popen.kill()
            popen.wait()
            member.ends.append("sigkill")

    def terminate(self, name: str, timeout_s: float = STOP_TIMEOUT_S) -> tuple[int | None, float]:
        """SIGTERM the member and wait for it: (exit code, seconds it took); SIGKILL past the
        timeout (the exit code is then negative)."""
        member = self.members[name]
        started = time.monotonic()
        popen = member.process.popen
        if popen is None or popen.poll() is not None:
            return (None if popen is None else popen.returncode), 0.0
        code = member.process.stop(signal.SIGTERM, timeout_s)
        took = time.monotonic() - started
        member.ends.append("sigterm" if code == 0 else f"sigterm→exit {code}")
        return code, took

    def reap(self, name: str) -> int | None:
        """The member's exit code if it has exited by itself (recorded once), else None."""
        member = self.members[name]
        popen = member.process.popen
        if popen is None or popen.returncode is not None:
            return None
        code = popen.poll()
        if code is not None:
            member.ends.append(f"exit {code}")
        return code

    def log_lines(self, name: str) -> list[str]:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def crash_records(self, prefix: str = "") -> list[dict[str, str]]:
        """Every `CHAOS-CRASH k=v ...` line written by members whose name starts with `prefix`."""
        found = []
        for name in self.members:
            if not name.startswith(prefix):
                continue
            for line in self.log_lines(name):
                match = CRASH_LINE.search(line)
                if match:
                    fields = dict(
                        part.split("=", 1) for part in match["fields"].split() if "=" in part
                    )
                    found.append({"member": name, **fields})
        return found

    def stop_all(self) -> None:
        for name, member in reversed(list(self.members.items())):
            if member.running:
                try:
                    self.terminate(name, STOP_TIMEOUT_S)
                except Exception:
                    log.exception("stopping %s failed", name)
                    self.kill(name)

    # -- context ----------------------------------------------------------------------

    def __enter__(self) -> ChaosStack:
        self.create_topics()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop_all()
        finally:
            if os.environ.get("CHAOS_KEEP_TOPICS") != "1":
                self.delete_topics()


@contextlib.contextmanager
def started(stack: ChaosStack) -> Iterator[ChaosStack]:
    """`with started(ChaosStack(...)) as stack:` topics created, members started, all undone."""
    with stack:
        stack.start()
        yield stack
