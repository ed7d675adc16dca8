"""Quota accuracy: several destinations at different configured rates, with 1, 2 and 4 senders.

`python -m bench.quota_accuracy [--window-s 60] [--senders 1 2 4]` runs against the local
broker (`make kafka-up`) under its own topic prefix, submits to `mail.submit` more mail
than each destination's quota allows in the window, records when each message reaches a
loopback SMTP receiver, and reports the measured rate per destination over the window
(after a warm-up) next to the configured one. Writes `bench/results/quota-latest.json`.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from deploy.local.stack import ServiceProcess, isolated_env
from schemas.rules import load_rules
from services.runtime.topics import ensure_topics

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench/results"
BOOTSTRAP = "127.0.0.1:9092"
#: Destination → configured messages per second.
RATES = {"q5.example": 5.0, "q10.example": 10.0, "q20.example": 20.0, "q40.example": 40.0}
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
    domains = "".join(f"  {d}:\n    messages_per_s: {r}\n" for d, r in RATES.items())
    path.write_text(
        "default_pool: default\nbounce_domain: bounces.bench.example\npools:\n  - name: default\n"
        "defaults:\n  max_connections: 4\n  max_messages_per_connection: 1000\n"
        "  max_recipients_per_batch: 10\n"
        f"domains:\n{domains}"
    )
    return path


def submit(prefix: str, window_s: float) -> int:
    """Enough mail for every destination to stay over its quota for warm-up plus window."""
    producer = Producer(
        {"bootstrap.servers": BOOTSTRAP, "linger.ms": 20, "enable.idempotence": True}
    )
    count = 0
    for domain, rate in RATES.items():
        total = int(rate * (WARMUP_S + window_s) * 1.3) + 20
        for start in range(0, total, 10):
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


def run(senders: int, window_s: float, work: Path) -> dict[str, Any]:
    prefix = f"bench-quota-{uuid.uuid4().hex[:6]}."
    rules = rules_file(work)
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    pools = load_rules(rules).pool_names()
    ensure_topics(admin, pools, prefix=prefix)
    recorder = Recorder()
    controller = Controller(recorder, hostname="127.0.0.1", port=free_port())
    controller.start()
    common = {
        "MAILRAIL_KAFKA_BOOTSTRAP": BOOTSTRAP,
        "MAILRAIL_TOPIC_PREFIX": prefix,
        "MAILRAIL_RULES": str(rules),
        "MAILRAIL_SMART_HOST": f"127.0.0.1:{controller.port}",
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
        time.sleep(max(0.0, started + WARMUP_S + window_s - time.time()))
        window = (started + WARMUP_S, started + WARMUP_S + window_s)
        results = {}
        for domain, rate in RATES.items():
            arrivals = [t for t in recorder.arrivals[domain] if window[0] <= t < window[1]]
            measured = len(arrivals) / window_s
            results[domain] = {
                "configured_per_s": rate,
                "measured_per_s": round(measured, 2),
                "error_pct": round((measured - rate) / rate * 100, 1),
            }
        return {
            "senders": senders,
            "window_s": window_s,
            "submitted": submitted,
            "destinations": results,
        }
    finally:
        for process in reversed(processes):
            process.stop()
        controller.stop()
        names = [f"{prefix}{n}" for n in ("mail.submit",)]  # keep the rest for inspection
        del names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window-s", type=float, default=60.0)
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="mailrail-quota-") as tmp:
        for senders in args.senders:
            work = Path(tmp) / f"s{senders}"
            work.mkdir()
            result = run(senders, args.window_s, work)
            runs.append(result)
            print(f"\n{senders} sender(s), {args.window_s:.0f} s window:")
            print(f"  {'destination':<14}{'configured/s':>14}{'measured/s':>12}{'error':>9}")
            for domain, row in result["destinations"].items():
                print(
                    f"  {domain:<14}{row['configured_per_s']:>14.1f}{row['measured_per_s']:>12.2f}"
                    f"{row['error_pct']:>8.1f}%"
                )
    worst = max(abs(row["error_pct"]) for r in runs for row in r["destinations"].values())
    report = {"ts": datetime.now(UTC).isoformat(), "runs": runs, "worst_error_pct": worst}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quota-latest.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nworst deviation: {worst:.1f}% (target ±5%)")


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
