"""Ingest replicas of their own beside the integration stack: Kafka down, rate limits, two
replicas racing on one Idempotency-Key, status after a restart, and signed webhooks."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka.admin import AdminClient

from deploy.local.stack import ServiceProcess, isolated_env
from services.ingest.webhooks import SIGNATURE_HEADER, verify_signature
from tests.integration import conftest as stack_conf
from tests.integration.conftest import API_KEY, OTHER_KEY, RULES, Stack, free_port, unique
from tests.support.kafka import BOOTSTRAP, EventLog, TopicTail

WEBHOOK_SECRET = "whsec-test-0123456789abcdef"


def ingest_env(**extra: str) -> dict[str, str]:
    return isolated_env(
        {
            "MAILRAIL_KAFKA_BOOTSTRAP": BOOTSTRAP,
            "MAILRAIL_TOPIC_PREFIX": getattr(stack_conf, "TOPIC_PREFIX", ""),
            "MAILRAIL_RULES": str(RULES),
            "MAILRAIL_API_KEYS": f"acme:{API_KEY},globex:{OTHER_KEY}",
            "MAILRAIL_SUBMIT_CONSUMER": "false",
            **extra,
        }
    )


class Replica:
    def __init__(self, tmp: Path, **extra: str) -> None:
        self.addr = f"127.0.0.1:{free_port()}"
        self.url = f"http://{self.addr}"
        env = ingest_env(MAILRAIL_HTTP_ADDR=self.addr, **extra)
        name = f"ingest-{uuid.uuid4().hex[:6]}"
        self.process = ServiceProcess(
            name, "services.ingest", env, self.url, log_path=tmp / f"{name}.log"
        )
        self.process.start()

    def client(self, key: str = API_KEY) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    def wait_alive(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("ingest did not come up")


@pytest.fixture
def replicas(kafka: AdminClient, tmp_path: Path) -> Iterator[Any]:
    """Start ingest replicas (HTTP only) on the session's topics; stopped after the test."""
    started: list[Replica] = []

    def start(ready: bool = True, **extra: str) -> Replica:
        replica = Replica(tmp_path, **extra)
        started.append(replica)
        if ready:
            replica.process.wait_ready()
        else:
            replica.wait_alive()
        return replica

    yield start
    for replica in started:
        replica.process.stop()


def body(*to: str, **extra: Any) -> dict[str, Any]:
    return {"from": "a@acme.example", "to": list(to), "subject": "s", "text": "t", **extra}


def test_kafka_down_answers_503_with_retry_after_quickly(replicas: Any) -> None:
    port = free_port()  # bound and closed again: nobody listens there
    replica = replicas(
        ready=False,
        MAILRAIL_KAFKA_BOOTSTRAP=f"127.0.0.1:{port}",
        MAILRAIL_PRODUCE_TIMEOUT_S="2",
        MAILRAIL_RETRY_AFTER_S="7",
    )
    with replica.client() as client:
        for headers in ({}, {"Idempotency-Key": "k1"}):
            started = time.monotonic()
            answer = client.post("/v1/messages", json=body("x@example.com"), headers=headers)
            elapsed = time.monotonic() - started
            assert answer.status_code == 503, answer.text
            assert answer.headers["Retry-After"] == "7"
            assert answer.json()["error"]["code"] == "kafka_unavailable"
            assert elapsed < 4.0
        assert httpx.get(f"{replica.url}/readyz").status_code == 503


def test_tenant_over_its_rate_gets_429_with_retry_after(replicas: Any) -> None:
    replica = replicas(
        MAILRAIL_RATE_RECIPIENTS_PER_S="100",
        MAILRAIL_RATE_BURST_RECIPIENTS="2000",
        MAILRAIL_TENANT_RATES="acme:0.1",  # the burst scales with it: 2 recipients
    )
    with replica.client() as client:
        first = client.post("/v1/messages", json=body(unique(), unique()))
        second = client.post("/v1/messages", json=body(unique(), unique(), unique()))
        other = replica.client(OTHER_KEY).post("/v1/messages", json=body(unique()))
    assert first.status_code == 202, first.text
    assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limited"
    assert int(second.headers["Retry-After"]) >= 1
    assert other.status_code == 202  # the limit is per tenant


def test_two_replicas_racing_on_one_key_publish_one_message(
    stack: Stack, replicas: Any, events: EventLog
) -> None:
    second = replicas()
    urls = [stack.url, second.url] * 4
    rcpt = unique("race")
    key = {"Idempotency-Key": f"race-{uuid.uuid4().hex}", "Authorization": f"Bearer {API_KEY}"}
    barrier = threading.Barrier(len(urls))

    def post(url: str) -> httpx.Response:
        barrier.wait()
        return httpx.post(f"{url}/v1/messages", json=body(rcpt), headers=key, timeout=30)

    with ThreadPoolExecutor(len(urls)) as pool:
        answers = list(pool.map(post, urls))
    ok = [a for a in answers if a.status_code == 202]
    assert ok and all(a.status_code in (202, 409) for a in answers), [a.text for a in answers]
    assert len({a.json()["id"] for a in ok}) == 1
    events.wait_types(rcpt, {"delivered"})
    time.sleep(1)
    assert [e.type.value for e in events.events(rcpt)].count("accepted") == 1
    # Once settled, every replica answers the first answer.
    for url in (stack.url, second.url):
        again = httpx.post(f"{url}/v1/messages", json=body(rcpt), headers=key, timeout=30)
        assert again.status_code == 202 and again.json() == ok[0].json()


def test_a_new_replica_knows_earlier_messages_and_keys(
    stack: Stack, replicas: Any, events: EventLog
) -> None:
    rcpt = unique("restart")
    key = {"Idempotency-Key": f"restart-{uuid.uuid4().hex}"}
    with stack.client() as client:
        first = client.post("/v1/messages", json=body(rcpt), headers=key).json()
    events.wait_types(rcpt, {"delivered"})
    fresh = replicas()  # state comes from Kafka only
    with fresh.client() as client:
        deadline = time.monotonic() + 30
        while True:
            status = client.get(f"/v1/messages/{first['id']}")
            if status.status_code == 200 and status.json()["recipients"][0].get("final"):
                break
            assert time.monotonic() < deadline, status.text
            time.sleep(0.3)
        replay = client.post("/v1/messages", json=body(rcpt), headers=key)
    assert status.json()["recipients"][0]["final"] == "delivered"
    assert replay.status_code == 202 and replay.json() == first


def _final_state(replica: Replica, message_id: str, timeout_s: float = 30.0) -> str:
    with replica.client() as client:
        deadline = time.monotonic() + timeout_s
        while True:
            status = client.get(f"/v1/messages/{message_id}")
            if status.status_code == 200 and status.json()["recipients"][0].get("final"):
                return str(status.json()["recipients"][0]["final"])
            assert time.monotonic() < deadline, status.text
            time.sleep(0.3)


def test_a_replica_with_a_state_dir_keeps_its_status_file_across_restarts(
    stack: Stack, replicas: Any, events: EventLog, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first_rcpt = unique("state-a")
    with stack.client() as client:
        first = client.post("/v1/messages", json=body(first_rcpt)).json()
    events.wait_types(first_rcpt, {"delivered"})
    replica = replicas(MAILRAIL_STATE_DIR=str(state))
    assert _final_state(replica, first["id"]) == "delivered"
    replica.process.stop()
    status_file = state / "status.sqlite3"
    assert status_file.exists() and status_file.stat().st_size > 0
    later_rcpt = unique("state-b")  # written while the replica was down
    with stack.client() as client:
        later = client.post("/v1/messages", json=body(later_rcpt)).json()
    events.wait_types(later_rcpt, {"delivered"})
    again = replicas(MAILRAIL_STATE_DIR=str(state))
    assert _final_state(again, first["id"]) == "delivered"
    assert _final_state(again, later["id"]) == "delivered"
    with sqlite3.connect(status_file) as db:
        rows = db.execute(
            "SELECT COUNT(*) FROM events WHERE message_id = ?", (first["id"],)
        ).fetchone()
    logged = [e for e in events.events() if e.message_id == first["id"]]
    assert rows[0] == len(logged) >= 3  # each event stored once, not once per start


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, Any], bool]] = []
    calls = 0

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        raw = self.rfile.read(length)
        type(self).calls += 1
        if type(self).calls == 1:  # the first delivery fails: it must be retried
            self.send_response(503)
            self.end_headers()
            return
        valid = verify_signature(WEBHOOK_SECRET, self.headers[SIGNATURE_HEADER], raw)
        type(self).received.append((json.loads(raw), valid))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


def test_webhooks_deliver_signed_events_with_retries(
    stack: Stack, replicas: Any, events: EventLog
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hooks = {
            "acme": [
                {
                    "url": f"http://127.0.0.1:{server.server_port}/hooks",
                    "secret": WEBHOOK_SECRET,
                    "events": ["accepted", "delivered"],
                }
            ]
        }
        replica = replicas(
            MAILRAIL_WEBHOOKS=json.dumps(hooks),
            MAILRAIL_WEBHOOK_GROUP_ID=f"hooks-{uuid.uuid4().hex[:6]}",
            MAILRAIL_WEBHOOK_BACKOFF_S="0.2",
        )
        rcpt = unique("hook")
        with replica.client() as client:
            message_id = client.post("/v1/messages", json=body(rcpt)).json()["id"]
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            mine = [
                (p, ok) for p, ok in _Receiver.received if p["event"]["message_id"] == message_id
            ]
            if {p["event"]["type"] for p, _ in mine} == {"accepted", "delivered"}:
                break
            time.sleep(0.2)
        assert {p["event"]["type"] for p, _ in mine} == {"accepted", "delivered"}, mine
        assert all(ok for _, ok in mine)
        assert all(p["event"]["recipient"] == rcpt for p, _ in mine)
        assert _Receiver.calls > len(_Receiver.received)  # the 503 was retried
    finally:
        server.shutdown()


#: How late another tenant's webhooks may be while one tenant's endpoint is stuck: an
#: endpoint that hangs is recognised within one POST timeout (`MAILRAIL_WEBHOOK_TIMEOUT_S`).
ISOLATION_S = 15.0
#: Far more events than the dispatcher holds in flight, all for the stuck endpoint.
STUCK_RECIPIENTS = 100


def _serve(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _hanging_endpoint(release: threading.Event, seen: list[bytes]) -> type[BaseHTTPRequestHandler]:
    class Hang(BaseHTTPRequestHandler):
        """Reads the request, then answers nothing until the test ends."""

        def do_POST(self) -> None:
            seen.append(self.rfile.read(int(self.headers["Content-Length"])))
            release.wait()

        def log_message(self, *_: Any) -> None:
            pass

    return Hang


def _recording_endpoint(
    received: list[tuple[float, dict[str, Any]]],
) -> type[BaseHTTPRequestHandler]:
    class Record(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            if verify_signature(WEBHOOK_SECRET, self.headers[SIGNATURE_HEADER], raw):
                received.append((time.monotonic(), json.loads(raw)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    return Record


def _wait(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s"
        time.sleep(0.1)


@pytest.mark.parametrize("broken", ["hangs", "down"])
def test_a_stuck_webhook_endpoint_holds_back_neither_mail_nor_other_tenants(
    stack: Stack, replicas: Any, events: EventLog, rejected: TopicTail, broken: str
) -> None:
    """acme's endpoint never answers (or refuses connections) while acme's mail produces
    many more events than the dispatcher holds in flight: mail is still delivered, globex's
    endpoint still gets its events promptly, and acme's events go to mail.rejected."""
    release = threading.Event()
    seen: list[bytes] = []
    received: list[tuple[float, dict[str, Any]]] = []
    hung = _serve(_hanging_endpoint(release, seen))
    good = _serve(_recording_endpoint(received))
    try:
        stuck_url = (
            f"http://127.0.0.1:{hung.server_port}/hooks"
            if broken == "hangs"
            else f"http://127.0.0.1:{free_port()}/hooks"  # nobody listens there
        )
        hooks = {
            "acme": [{"url": stuck_url, "secret": WEBHOOK_SECRET}],
            "globex": [
                {
                    "url": f"http://127.0.0.1:{good.server_port}/hooks",
                    "secret": WEBHOOK_SECRET,
                    "events": ["accepted", "delivered"],
                }
            ],
        }
        replica = replicas(
            MAILRAIL_WEBHOOKS=json.dumps(hooks),
            MAILRAIL_WEBHOOK_GROUP_ID=f"hooks-{uuid.uuid4().hex[:6]}",
            MAILRAIL_WEBHOOK_MAX_IN_FLIGHT="50",
        )

        def hooked(message_id: str) -> set[str]:
            return {
                p["event"]["type"] for _, p in received if p["event"]["message_id"] == message_id
            }

        with replica.client(OTHER_KEY) as globex:
            # Once a hook arrives, the new group reads from a position before what follows.
            warm_up = globex.post("/v1/messages", json=body(unique("warm-up"))).json()["id"]
            _wait(lambda: "delivered" in hooked(warm_up), 30, "warm-up hooks")
            with replica.client() as acme:
                stuck = [unique("stuck") for _ in range(STUCK_RECIPIENTS)]
                acme_id = acme.post("/v1/messages", json=body(*stuck)).json()["id"]
                if broken == "hangs":
                    _wait(lambda: len(seen) >= 10, 30, "POSTs to the hanging endpoint")
                started = time.monotonic()
                later = unique("still-delivered")
                acme.post("/v1/messages", json=body(later))
                isolated = globex.post("/v1/messages", json=body(unique("isolated"))).json()["id"]
            stack.sink.wait_for(lambda _: bool(stack.sink.messages_for(later)), ISOLATION_S)
            _wait(
                lambda: hooked(isolated) == {"accepted", "delivered"},
                ISOLATION_S,
                "globex's webhooks while acme's endpoint is stuck",
            )
            assert time.monotonic() - started < ISOLATION_S
            assert not release.is_set()  # acme's endpoint was stuck all along

        # Nothing is dropped silently: each of acme's events is on mail.rejected.
        def sent() -> set[tuple[str, str]]:
            return {(e.recipient, e.type.value) for e in events.events(message_id=acme_id)}

        def given_up() -> set[tuple[str, str]]:
            out = set()
            for record in rejected.records():
                headers = dict(record.headers() or [])
                # mail.rejected holds other tests' records too, some not even UTF-8.
                if headers.get("mailrail-error-code") != b"webhook_failed":
                    continue
                event = json.loads(record.value() or b"{}")
                if event.get("message_id") == acme_id:
                    out.add((event["recipient"], event["type"]))
            return out

        events.wait_types(stuck[-1], {"delivered"})
        _wait(lambda: sent() <= given_up(), 60, "acme's events on mail.rejected")
        assert len(sent()) >= 3 * STUCK_RECIPIENTS
    finally:
        release.set()
        hung.shutdown()
        good.shutdown()
