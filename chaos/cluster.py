"""A private KRaft cluster of 1 or 3 nodes on loopback, from the jars of deploy/local/kafka/lib.

Each node is broker and controller (a static quorum of every node); ports are free loopback
ports chosen at start, data lives under chaos/run/cluster-<id>/ (git-ignored) and is deleted
when the cluster stops. With 3 nodes: replication factor 3, `min.insync.replicas=2`, no
unclean leader election, so an acknowledged write (`acks=all`) survives any one node.

    with KafkaCluster(3) as cluster:
        cluster.bootstrap              # "127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3"
        cluster.kill(node)             # SIGKILL one node
        cluster.start_node(node)       # and back, on the same data
        cluster.leader_of(topic, 0)    # the node id leading a partition
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from confluent_kafka.admin import AdminClient

from chaos.stack import REPO, RUN_DIR, free_port

log = logging.getLogger(__name__)

KAFKA_DIR = REPO / "deploy/local/kafka"
LIB = KAFKA_DIR / "lib"
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
JVM_OPTS = [
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-Djava.awt.headless=true",
    f"-Dlog4j2.configurationFile={KAFKA_DIR / 'log4j2.xml'}",
]


@dataclass
class Node:
    node_id: int
    port: int
    controller_port: int
    dir: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


class KafkaCluster:
    def __init__(self, nodes: int = 3) -> None:
        if not (LIB / ".resolved").exists():
            raise SystemExit("the Kafka jars are missing: run `make kafka-up` once")
        java = shutil.which("java")
        if java is None:
            raise SystemExit("java (17+) is needed for the private cluster")
        self._java = java
        self.dir = RUN_DIR / f"cluster-{uuid.uuid4().hex[:8]}"
        self.nodes = [
            Node(i, free_port(), free_port(), self.dir / f"node-{i}") for i in range(1, nodes + 1)
        ]
        self.replication_factor = min(3, nodes)
        self.bootstrap = ",".join(n.address for n in self.nodes)

    def _config(self, node: Node) -> Path:
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        rf, isr = self.replication_factor, max(1, self.replication_factor - 1)
        lines = [
            "process.roles=broker,controller",
            f"node.id={node.node_id}",
            f"controller.quorum.voters={voters}",
            f"listeners=PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{node.port}",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=PLAINTEXT",
            "controller.listener.names=CONTROLLER",
            "auto.create.topics.enable=false",
            "num.partitions=8",
            f"default.replication.factor={rf}",
            f"min.insync.replicas={isr}",
            "unclean.leader.election.enable=false",
            f"offsets.topic.replication.factor={rf}",
            f"transaction.state.log.replication.factor={rf}",
            f"transaction.state.log.min.isr={isr}",
            f"share.coordinator.state.topic.replication.factor={rf}",
            f"share.coordinator.state.topic.min.isr={isr}",
            "group.initial.rebalance.delay.ms=0",
            "message.max.bytes=20971520",
            "replica.fetch.max.bytes=20971520",
            f"log.dirs={node.dir / 'data'}",
        ]
        path = node.dir / "server.properties"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _java_cmd(self, node: Node, *args: str) -> list[str]:
        return [
            self._java,
            "-cp",
            f"{LIB}/*",
            *JVM_OPTS,
            f"-Dkafka.logs.dir={node.dir}",
            *args,
        ]

    def start(self) -> None:
        cluster_id = subprocess.run(
            self._java_cmd(self.nodes[0], "kafka.tools.StorageTool", "random-uuid"),
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout.strip()
        for node in self.nodes:
            (node.dir / "data").mkdir(parents=True)
            config = self._config(node)
            with (node.dir / "kafka.out").open("ab") as out:
                subprocess.run(
                    self._java_cmd(
                        node,
                        "kafka.tools.StorageTool",
                        "format",
                        "--config",
                        str(config),
                        "--cluster-id",
                        cluster_id,
                    ),
                    stdout=out,
                    stderr=out,
                    check=True,
                    timeout=120,
                )
        for node in self.nodes:
            self.start_node(node.node_id, wait=False)
        self.wait_healthy(len(self.nodes))

    def node(self, node_id: int) -> Node:
        return next(n for n in self.nodes if n.node_id == node_id)

    def start_node(self, node_id: int, *, wait: bool = True) -> None:
        node = self.node(node_id)
        if node.running:
            return
        out = (node.dir / "kafka.out").open("ab")
        node.popen = subprocess.Popen(
            self._java_cmd(node, "kafka.Kafka", str(node.dir / "server.properties")),
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        if wait:
            self.wait_healthy(sum(n.running for n in self.nodes))

    def kill(self, node_id: int) -> None:
        """SIGKILL the node and reap it."""
        node = self.node(node_id)
        if node.popen is not None and node.popen.poll() is None:
            node.popen.kill()
            node.popen.wait()

    def pause(self, node_id: int) -> None:
        node = self.node(node_id)
        if node.popen is not None:
            node.popen.send_signal(signal.SIGSTOP)

    def resume(self, node_id: int) -> None:
        node = self.node(node_id)
        if node.popen is not None:
            node.popen.send_signal(signal.SIGCONT)

    def stop_node(self, node_id: int) -> None:
        node = self.node(node_id)
        if node.popen is None or node.popen.poll() is not None:
            return
        node.popen.send_signal(signal.SIGCONT)
        node.popen.terminate()
        try:
            node.popen.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            node.popen.kill()
            node.popen.wait()

    def admin(self) -> AdminClient:
        return AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})

    def wait_healthy(self, brokers: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until `brokers` brokers are registered with the cluster."""
        deadline = time.monotonic() + timeout_s
        admin = self.admin()
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.popen is not None and node.popen.poll() is not None:
                    raise RuntimeError(f"kafka node {node.node_id} exited: see {node.dir}")
            try:
                if len(admin.list_topics(timeout=2).brokers) >= brokers:
                    return
            except Exception:  # noqa: S110 - not up yet
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the private cluster did not reach {brokers} brokers in {timeout_s} s")

    def leader_of(self, topic: str, partition: int) -> int:
        metadata = self.admin().list_topics(topic, timeout=10)
        return int(metadata.topics[topic].partitions[partition].leader)

    def in_sync(self, topic: str) -> bool:
        """True when every partition of the topic has all its replicas in sync."""
        metadata = self.admin().list_topics(topic, timeout=10).topics[topic]
        return all(len(p.isrs) == len(p.replicas) for p in metadata.partitions.values())

    def stop(self) -> None:
        for node in self.nodes:
            try:
                self.stop_node(node.node_id)
            except Exception:
                log.exception("stopping kafka node %d", node.node_id)
                self.kill(node.node_id)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> KafkaCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
