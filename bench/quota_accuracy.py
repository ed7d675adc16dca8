"""Quota accuracy: destinations at different configured rates, with 1, 2 and 4 senders.

`python -m bench.quota_accuracy [--window-s 60] [--senders 1 2 4] [--no-rebalance]` runs
against the local broker (`make kafka-up`) under its own topic prefix, submits to
`mail.submit` more mail than each destination's quota allows in the window, records when each
message reaches a loopback SMTP receiver, and reports the measured rate per destination over
the window (after a warm-up) next to the configured one. The destinations cover each kind of
rule: per-second quotas, a per-minute quota, a provider group listed by domain and one matched
by MX host suffix (resolved through a loopback DNS server), whose domains share one quota.
A last run starts with 2 senders and adds a third halfway through the window, so partitions
(and the quotas of their destinations) change owner under load. Writes
`bench/results/quota-latest.json`; `make bench` runs it too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from deploy.local.stack import ServiceProcess, isolated_env
from schemas.catalogue import concrete_topics
from schemas.rules import load_rules
from services.runtime.topics import ensure_topics
from tests.support.dns_server import NameRecords, start_dns_server

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench/results"
BOOTSTRAP = "127.0.0.1:9092"


@dataclass(frozen=True)
class Destination:
    """A throttle key: its rule (YAML under `domains:` or `providers:`), the recipient
    domains that share it, and the rate that rule allows, in messages per second."""

    key: str
    rule: str
    domains: tuple[str, ...]
    per_s: float
    provider: bool = False


DESTINATIONS = (
    Destination("q5.example", "messages_per_s: 5", ("q5.example",), 5.0),
    Destination("q10.example", "messages_per_s: 10", ("q10.example",), 10.0),
    Destination("q40.example", "messages_per_s: 40", ("q40.example",), 40.0),
    Destination("m600.example", "messages_per_min: 600", ("m600.example",), 10.0),
    Destination(
        "listed",
        "domains: [l1.example, l2.example]\n    messages_per_s: 15",
        ("l1.example", "l2.example"),
        15.0,
        provider=True,
    ),
    Destination(
        "bymx",
        "mx_suffixes: [mx.bymx.example]\n    messages_per_s: 20",
        ("x1.example", "x2.example"),
        20.0,
        provider=True,
    ),
)
#: The MX records that put x1 and x2 in the `bymx` group.
DNS_RECORDS: dict[str, NameRecords] = {}
for _domain in ("x1.example", "x2.example"):
    DNS_RECORDS[_domain] = {"MX": [(10, f"in.{_domain}.mx.bymx.example")]}
    DNS_RECORDS[f"in.{_domain}.mx.bymx.example"] = {"A": ["127.0.0.1"]}
WARMUP_S = 15.0


class Recorder:
    """aiosmtpd handler: when each recipient's message arrived, per domain."""

    def __init__(self) -> None:
        self.arrivals: dict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        now = time.time()
        with self._lock:
            for rcpt in envelope.rcpt_tos:
                self.arrivals[rcpt.rpartition("@")[2]].append(now)
        return "250 2.0.0 OK"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rules_file(directory: Path) -> Path:
    path = directory / "rules.yaml"
    domains = "".join(f"  {d.key}:\n    {d.rule}\n" for d in DESTINATIONS if not d.provider)
    providers = "".join(f"  {d.key}:\n    {d.rule}\n" for d in DESTINATIONS if d.provider)
    path.write_text(
        "default_pool: default\nbounce_domain: bounces.bench.example\npools:\n  - name: default\n"
        "defaults:\n  max_connections: 4\n  max_messages_per_connection: 1000\n"
        "  max_recipients_per_batch: 10\n"
        f"domains:\n{domains}providers:\n{providers}"
    )
    return path


def submit(prefix: str, window_s: float) -> int:
    """Enough mail for every destination to stay over its quota for warm-up plus window."""
    producer = Producer(
        {"bootstrap.servers": BOOTSTRAP, "linger.ms": 20, "enable.idempotence": True}
    )
    count = 0
    for destination in DESTINATIONS:
        total = int(destination.per_s * (WARMUP_S + window_s) * 1.3) + 20
        for start in range(0, total, 10):
            domain = destination.domains[(start // 10) % len(destination.domains)]
            submission = {
                "tenant": "bench",
                "from": "bench@bench.example",
                "to": [f"u{i}@{domain}" for i in range(start, min(start + 10, total))],
                "subject": "quota",
                "text": "x" * 2000,
            }
            producer.produce(f"{prefix}mail.submit", json.dumps(submission).encode())
            producer.poll(0)
        count += total
    producer.flush(30)
    return count


def run(
    senders: int, window_s: float, work: Path, join_after_s: float | None = None
) -> dict[str, Any]:
    """One measurement; with `join_after_s`, one more sender joins that long into the window."""
    prefix = f"bench-quota-{uuid.uuid4().hex[:6]}."
    rules = rules_file(work)
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    pools = load_rules(rules).pool_names()
    ensure_topics(admin, pools, prefix=prefix)
    recorder = Recorder()
    controller = Controller(recorder, hostname="127.0.0.1", port=free_port())
    controller.start()
    dns = start_dns_server(DNS_RECORDS)
    common = {
        "MAILRAIL_KAFKA_BOOTSTRAP": BOOTSTRAP,
        "MAILRAIL_TOPIC_PREFIX": prefix,
        "MAILRAIL_RULES": str(rules),
        "MAILRAIL_SMART_HOST": f"127.0.0.1:{controller.port}",
        "MAILRAIL_DNS": dns.address,
        "MAILRAIL_LOG_LEVEL": "WARNING",
    }

    def service(name: str, module: str, **extra: str) -> ServiceProcess:
        admin_addr = f"127.0.0.1:{free_port()}"
        env = isolated_env({**common, "MAILRAIL_ADMIN_ADDR": admin_addr, **extra})
        return ServiceProcess(
            name, module, env, f"http://{admin_addr}", log_path=work / f"{name}.log"
        )

    processes = [
        service("ingest", "services.ingest", MAILRAIL_HTTP_ADDR=f"127.0.0.1:{free_port()}"),
        service("router", "services.router"),
        *(
            service(f"sender-{i}", "services.sender", MAILRAIL_POOL="default")
            for i in range(senders)
        ),
    ]
    processes[0].health_url = f"http://{processes[0].env['MAILRAIL_HTTP_ADDR']}"
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.wait_ready()
        time.sleep(3.0)  # let the sender group settle before the load
        started = time.time()
        submitted = submit(prefix, window_s)
        window = (started + WARMUP_S, started + WARMUP_S + window_s)
        if join_after_s is not None:
            time.sleep(max(0.0, window[0] + join_after_s - time.time()))
            joiner = service(f"sender-{senders}", "services.sender", MAILRAIL_POOL="default")
            processes.append(joiner)
            joiner.start()
        time.sleep(max(0.0, window[1] - time.time()))
        results = {}
        for destination in DESTINATIONS:
            arrivals = [
                t
                for domain in destination.domains
                for t in recorder.arrivals[domain]
                if window[0] <= t < window[1]
            ]
            measured = len(arrivals) / window_s
            results[destination.key] = {
                "rule": destination.rule.replace("\n    ", "; "),
                "configured_per_s": destination.per_s,
                "measured_per_s": round(measured, 2),
                "error_pct": round((measured - destination.per_s) / destination.per_s * 100, 1),
            }
        label = f"{senders}" if join_after_s is None else f"{senders}->{senders + 1}"
        return {
            "senders": label,
            "window_s": window_s,
            "submitted": submitted,
            "destinations": results,
        }
    finally:
        for process in reversed(processes):
            process.stop()
        controller.stop()
        dns.stop()
        admin.delete_topics([name for name, _ in concrete_topics(pools, prefix)])


def measure(window_s: float, senders: list[int], rebalance: bool) -> dict[str, Any]:
    """Every run, printed as it ends; the report `make bench` keeps."""
    runs: list[dict[str, Any]] = []
    plans: list[tuple[int, float | None]] = [(n, None) for n in senders]
    if rebalance:
        plans.append((2, window_s / 2))
    with tempfile.TemporaryDirectory(prefix="mailrail-quota-") as tmp:
        for count, join_after_s in plans:
            work = Path(tmp) / f"s{count}-{len(runs)}"
            work.mkdir()
            result = run(count, window_s, work, join_after_s)
            runs.append(result)
            print(f"\n{result['senders']} sender(s), {window_s:.0f} s window:")
            print(f"  {'destination':<14}{'configured/s':>14}{'measured/s':>12}{'error':>9}")
            for key, row in result["destinations"].items():
                print(
                    f"  {key:<14}{row['configured_per_s']:>14.1f}{row['measured_per_s']:>12.2f}"
                    f"{row['error_pct']:>8.1f}%"
                )
    worst = max(abs(row["error_pct"]) for r in runs for row in r["destinations"].values())
    return {"ts": datetime.now(UTC).isoformat(), "runs": runs, "worst_error_pct": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window-s", type=float, default=60.0)
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--no-rebalance", action="store_true", help="skip the 2->3 run")
    args = parser.parse_args()
    report = measure(args.window_s, args.senders, not args.no_rebalance)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quota-latest.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nworst deviation: {report['worst_error_pct']:.1f}% (target ±5%)")


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
