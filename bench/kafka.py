"""A private, throw-away Kafka broker for one bench run.

Same jars, JVM options and server.properties as `deploy/local/kafka.sh`, but its own ports
and a fresh data folder under `bench/run/`: the developers' shared broker (and whatever
tests run against it) neither sees the bench's 100,000 messages nor blurs its CPU figures,
and every run starts from empty topics.
"""

from __future__ import annotations

import base64
import logging
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka.admin import AdminClient

from bench.procs import Popen, Registry, free_port, stop_child, wait_for_port
from deploy.local.stack import isolated_env

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
KAFKA_DIR = REPO / "deploy/local/kafka"
LIB = KAFKA_DIR / "lib"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 40.0
#: As in deploy/local/kafka.sh, so the broker measured is the broker developers run.
JVM_OPTS = [
    "-Xms256m",
    "-Xmx768m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
    f"-Dlog4j2.configurationFile={KAFKA_DIR / 'log4j2.xml'}",
]


class PrivateBroker:
    def __init__(self, run_dir: Path, registry: Registry) -> None:
        self.dir = run_dir / "kafka"
        self.registry = registry
        self.port = free_port()
        self.controller_port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.popen: Popen | None = None

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def start(self, rules: Path, src: Path = REPO) -> None:
        if not (LIB / ".resolved").exists():
            raise SystemExit(
                "the Kafka jars are missing: run `make kafka-up` once (make bench does)"
            )
        shutil.rmtree(self.dir, ignore_errors=True)
        data = self.dir / "data"
        data.mkdir(parents=True)
        config = self.dir / "server.properties"
        template = (KAFKA_DIR / "server.properties").read_text()
        config.write_text(
            template.replace(":9092", f":{self.port}").replace(":9093", f":{self.controller_port}")
            + f"\nlog.dirs={data}\n"
        )
        java = ["java", "-cp", f"{LIB}/*", *JVM_OPTS, f"-Dkafka.logs.dir={self.dir}"]
        out = (self.dir / "kafka.out").open("ab")
        subprocess.run(
            [
                *java,
                "kafka.tools.StorageTool",
                "format",
                "--config",
                str(config),
                "--cluster-id",
                _cluster_id(),
                "--standalone",
            ],
            check=True,
            stdout=out,
            stderr=out,
            timeout=120,
        )
        log.info("starting a private Kafka broker on %s", self.bootstrap)
        self.popen = subprocess.Popen(
            [*java, "kafka.Kafka", str(config)],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        self.registry.add(self.popen.pid, "kafka")
        wait_for_port(self.port, START_TIMEOUT_S, self.popen)
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        deadline = time.monotonic() + START_TIMEOUT_S
        while not admin.list_topics(timeout=5).brokers:
            if time.monotonic() > deadline:
                raise TimeoutError("the private broker does not answer")
            time.sleep(0.5)
        # Topics from the catalogue of the code under test (the snapshot), not the bench's.
        subprocess.run(
            [sys.executable, "-m", "services.runtime.topics", "--rules", str(rules)],
            cwd=src,
            env=isolated_env({"MAILRAIL_KAFKA_BOOTSTRAP": self.bootstrap}),
            check=True,
            timeout=120,
        )

    def stop(self) -> None:
        if self.popen is not None:
            stop_child(self.popen, STOP_TIMEOUT_S)
            self.registry.remove(self.popen.pid)
            self.popen = None


def _cluster_id() -> str:
    """A random cluster id in Kafka's form (URL-safe base64 of a UUID, unpadded)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
