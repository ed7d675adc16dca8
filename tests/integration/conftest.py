"""The integration stack: the local Kafka broker, the four services as real processes, a
scripted receiving SMTP server they relay to, and a DNS server plus MX host for the pool that
resolves MX records. One stack serves the whole session; tests tell their mail apart by
unique recipients.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from confluent_kafka.admin import AdminClient

from deploy.local.stack import ServiceProcess, isolated_env
from schemas.catalogue import concrete_topics
from schemas.rules import load_rules
from services.runtime.topics import ensure_topics
from tests.support.dkim_keys import dkim_records, write_key_folder
from tests.support.dns_server import RunningDnsServer, start_dns_server
from tests.support.kafka import BOOTSTRAP, EventLog, TopicTail, broker_available
from tests.support.otlp import OtlpReceiver
from tests.support.smtp_server import RunningSmtpServer, start_smtp_server

RULES = Path(__file__).parent / "rules.yaml"
#: This session's own topics and consumer groups: a developer's `make run`, or another test
#: run on the same broker, never takes this session's records (or it theirs).
TOPIC_PREFIX = f"test-{uuid.uuid4().hex[:8]}."
API_KEY = "test-key-acme"
OTHER_KEY = "test-key-globex"
MX_HOST_ADDRESS = "127.0.0.7"
#: The `default` sender signs mail from signed.example (RSA and Ed25519), and every message
#: as the platform (mailrail.test); the stack's DNS server publishes the public keys.
DKIM_KEYS = {"signed.example": ["s1.rsa", "s2.ed25519"], "mailrail.test": ["p1.rsa"]}
DKIM_CONFIG = {"platform_domains": ["mailrail.test"]}
RETRY_SCHEDULE_S = "[1, 1, 1]"
#: Shared by sender and bounce (return paths) and by sender, ingest and bounce (one-click).
VERP_KEY = "integration-test-verp-key-0001"
UNSUBSCRIBE_KEY = "integration-test-unsubscribe-key-0001"
MAX_AGE_S = "12"
MAX_MESSAGE_BYTES = 1024 * 1024
#: Opens ingest's admin API and /ui.
ADMIN_KEY = "test-admin-key-0001"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def topic(name: str) -> str:
    """The session's name of a catalogue topic, e.g. `topic("mail.submit")`."""
    return TOPIC_PREFIX + name


def unique(local: str = "rcpt", domain: str = "example.com") -> str:
    return f"{local}-{uuid.uuid4().hex[:10]}@{domain}"


@dataclass
class Stack:
    url: str
    services: dict[str, ServiceProcess]
    sink: RunningSmtpServer
    mx: RunningSmtpServer
    dns: RunningDnsServer
    #: Every span the services export (OTLP over HTTP).
    traces: OtlpReceiver

    def client(self, key: str = API_KEY) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    def restart(self, name: str) -> None:
        service = self.services[name]
        service.stop()
        service.start().wait_ready()


@pytest.fixture(scope="session")
def kafka() -> Iterator[AdminClient]:
    if not broker_available():
        pytest.fail(f"no Kafka broker on {BOOTSTRAP}: run `make kafka-up` (make test does)")
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    pools = load_rules(RULES).pool_names()
    ensure_topics(admin, pools, prefix=TOPIC_PREFIX)
    yield admin
    names = [name for name, _ in concrete_topics(pools, TOPIC_PREFIX)]
    for future in admin.delete_topics(names, operation_timeout=30).values():
        future.result()


@pytest.fixture(scope="session")
def events(kafka: AdminClient) -> Iterator[EventLog]:
    log = EventLog(topic("mail.events"))
    yield log
    log.stop()


@pytest.fixture(scope="session")
def rejected(kafka: AdminClient) -> Iterator[TopicTail]:
    tail = TopicTail(topic("mail.rejected"))
    yield tail
    tail.stop()


@pytest.fixture(scope="session")
def stack(
    kafka: AdminClient, events: EventLog, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("service-logs")
    sink = start_smtp_server()
    mx = start_smtp_server(host=MX_HOST_ADDRESS)
    dns = start_dns_server(
        {
            "mx-routed.example": {"MX": [(10, "mx1.mx-routed.example")]},
            "mx1.mx-routed.example": {"A": [MX_HOST_ADDRESS]},
            "no-such-domain.example": "NXDOMAIN",
        }
    )
    traces = OtlpReceiver()
    dkim_keys = write_key_folder(tmp_path_factory.mktemp("dkim"), DKIM_KEYS, DKIM_CONFIG)
    dns.update(dkim_records(dkim_keys))
    common = {
        "MAILRAIL_KAFKA_BOOTSTRAP": BOOTSTRAP,
        "MAILRAIL_TOPIC_PREFIX": TOPIC_PREFIX,
        "MAILRAIL_RULES": str(RULES),
        "MAILRAIL_RETRY_SCHEDULE_S": RETRY_SCHEDULE_S,
        "MAILRAIL_MAX_AGE_S": MAX_AGE_S,
        "MAILRAIL_COMMIT_INTERVAL_S": "0.5",
        "MAILRAIL_DRAIN_TIMEOUT_S": "20",
        # Held mail waits this long before a sender looks again: a resume, move or purge
        # reaching it sooner is the router's doing (it follows mail.control).
        "MAILRAIL_PAUSE_RECHECK_S": "60",
        "MAILRAIL_BUSY_HOLD_S": "2",
        "MAILRAIL_VERP_KEY": VERP_KEY,
        "MAILRAIL_UNSUBSCRIBE_KEY": UNSUBSCRIBE_KEY,
        "MAILRAIL_STATS_INTERVAL_S": "1",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": traces.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    http_addr = f"127.0.0.1:{free_port()}"
    common["MAILRAIL_PUBLIC_URL"] = f"http://{http_addr}"

    def service(name: str, module: str, **extra: str) -> ServiceProcess:
        admin = extra.get("MAILRAIL_HTTP_ADDR") or f"127.0.0.1:{free_port()}"
        env = isolated_env({**common, "MAILRAIL_ADMIN_ADDR": admin, **extra})
        return ServiceProcess(name, module, env, f"http://{admin}", log_path=logs / f"{name}.log")

    services = {
        "ingest": service(
            "ingest",
            "services.ingest",
            MAILRAIL_HTTP_ADDR=http_addr,
            MAILRAIL_API_KEYS=f"acme:{API_KEY},globex:{OTHER_KEY}",
            MAILRAIL_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES),
            MAILRAIL_ADMIN_KEYS=ADMIN_KEY,
        ),
        "router": service("router", "services.router"),
        "sender": service(
            "sender",
            "services.sender",
            MAILRAIL_POOL="default",
            MAILRAIL_SMART_HOST=sink.address,
            MAILRAIL_DKIM_KEYS=str(dkim_keys),
        ),
        "sender-mx": service(
            "sender-mx",
            "services.sender",
            MAILRAIL_POOL="mxtest",
            MAILRAIL_DNS=dns.address,
            MAILRAIL_SMTP_PORT=str(mx.port),
        ),
        "bounce": service(
            "bounce", "services.bounce", MAILRAIL_BOUNCE_SMTP_ADDR=f"127.0.0.1:{free_port()}"
        ),
    }
    try:
        for process in services.values():
            process.start()
        for process in services.values():
            process.wait_ready()
        yield Stack(f"http://{http_addr}", services, sink, mx, dns, traces)
    finally:
        for process in services.values():
            process.stop()
        traces.stop()
        sink.stop()
        mx.stop()
        dns.stop()
