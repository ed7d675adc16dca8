"""Ingest alone under load: accepted recipients per second, and accept latency when paced.

    python -m bench.ingest_load [--batch 100] [--concurrency 8] [--seconds 15]
                                [--paced-rate 1500] [--idempotency-keys]

Starts its own ingest process (HTTP only: no `mail.submit` consumer) against the broker at
MAILRAIL_KAFKA_BOOTSTRAP (default 127.0.0.1:9092), with a rules file whose only pool is
`ingestbench`: no router of the stack has that pool, so what the bench publishes is
rejected by any router in one step and never mailed. Then two phases:

1. throughput: `--concurrency` clients POST batches of `--batch` recipients back to back
   for `--seconds`: accepted recipients per second (202 only after acks=all).
2. paced: open-loop requests at fixed times, `--paced-rate` recipients per second (default:
   half the 3,000/s target) in batches of `--batch`. Latency runs from each request's
   scheduled time to its answer, so a slow answer is never hidden by a late send
   (no coordinated omission): p50, p99, max.

Prints one JSON object. Every loop is bounded by `--seconds`; every address is on loopback.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
API_KEY = "ingest-bench-key"
TENANT = "ingestbench"
RULES = """default_pool: ingestbench
pools:
  - name: ingestbench
    ehlo: bench.mailrail.localhost
"""
READY_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _body(batch: int, run: str, n: int, keyed: bool) -> tuple[bytes, dict[str, str]]:
    recipients = [
        {"email": f"r{n}-{i}-{run}@bench{i % 40}.example.com", "vars": {"first_name": f"N{i}"}}
        for i in range(batch)
    ]
    body = {
        "from": "Bench <bench@mailrail.example.com>",
        "to": recipients,
        "subject": "Hello {{first_name}}",
        "text": "Hi {{first_name}}, this is a bench message. " * 20,
        "tags": ["campaign:bench"],
    }
    headers = {"Idempotency-Key": f"{run}-{n}"} if keyed else {}
    return json.dumps(body).encode(), headers


class Ingest:
    """The ingest service as a child process on a loopback port."""

    def __init__(self, bootstrap: str, workdir: Path) -> None:
        self.addr = f"127.0.0.1:{_free_port()}"
        rules = workdir / "rules.yaml"
        rules.write_text(RULES)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MAILRAIL_")},
            "MAILRAIL_KAFKA_BOOTSTRAP": bootstrap,
            "MAILRAIL_HTTP_ADDR": self.addr,
            "MAILRAIL_RULES": str(rules),
            "MAILRAIL_API_KEYS": f"{TENANT}:{API_KEY}",
            "MAILRAIL_SUBMIT_CONSUMER": "false",
            "MAILRAIL_RATE_RECIPIENTS_PER_S": "1000000",
            "MAILRAIL_RATE_BURST_RECIPIENTS": "1000000",
            "MAILRAIL_LOG_LEVEL": "WARNING",
            "MAILRAIL_STATUS_WINDOW_S": "60",
        }
        self.log = (workdir / "ingest.log").open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "services.ingest"],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=self.log,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"ingest exited with {self.popen.returncode}")
            try:
                with urllib.request.urlopen(f"http://{self.addr}/readyz", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("ingest not ready")

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self.log.close()


async def throughput(
    url: str, batch: int, concurrency: int, seconds: float, keyed: bool
) -> dict[str, float]:
    run = uuid.uuid4().hex[:8]
    counter = iter(range(10**9))
    accepted = errors = requests = 0
    deadline = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal accepted, errors, requests
        while time.monotonic() < deadline:
            body, extra = _body(batch, run, next(counter), keyed)
            answer = await http.post("/v1/messages", content=body, headers=headers | extra)
            requests += 1
            if answer.status_code == 202:
                accepted += len(answer.json()["recipients"])
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:
        await http.get("/healthz")
        started = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return {
        "seconds": round(elapsed, 2),
        "requests": requests,
        "errors": errors,
        "accepted_recipients": accepted,
        "recipients_per_s": round(accepted / elapsed, 1),
    }


async def paced(
    url: str, batch: int, rate_per_s: float, seconds: float, keyed: bool
) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    interval_s = batch / rate_per_s
    count = max(1, int(seconds / interval_s))
    bodies = [_body(batch, run, n, keyed) for n in range(count)]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

    async def one(http: httpx.AsyncClient, at: float, n: int) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        body, extra = bodies[n]
        answer = await http.post("/v1/messages", content=body, headers=headers | extra)
        latencies.append(time.monotonic() - at)
        statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:
        await http.get("/healthz")
        start = time.monotonic() + 0.2
        await asyncio.gather(*(one(http, start + n * interval_s, n) for n in range(count)))
    ordered = sorted(latencies)
    return {
        "target_recipients_per_s": rate_per_s,
        "requests": count,
        "statuses": {str(k): v for k, v in statuses.items()},
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=100, help="recipients per request")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    parser.add_argument("--paced-rate", type=float, default=1500.0, help="recipients/s")
    parser.add_argument("--idempotency-keys", action="store_true", help="a key per request")
    args = parser.parse_args()
    bootstrap = os.environ.get("MAILRAIL_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as workdir:
        ingest = Ingest(bootstrap, Path(workdir))
        try:
            ingest.wait_ready()
            url = f"http://{ingest.addr}"
            closed = asyncio.run(
                throughput(url, args.batch, args.concurrency, args.seconds, args.idempotency_keys)
            )
            open_loop = asyncio.run(
                paced(url, args.batch, args.paced_rate, args.seconds, args.idempotency_keys)
            )
        finally:
            ingest.stop()
    result = {
        "bench": "ingest_load",
        "batch": args.batch,
        "concurrency": args.concurrency,
        "idempotency_keys": args.idempotency_keys,
        "throughput": closed,
        "paced": open_loop,
        "targets": {"recipients_per_s": 3000, "p99_ms_at_half_rate": 50},
        "met": closed["recipients_per_s"] >= 3000 and open_loop["p99_ms"] <= 50,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
