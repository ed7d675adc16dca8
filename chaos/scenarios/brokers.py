"""Kafka itself fails: scenarios 1 and 2, each on a private cluster (chaos/cluster.py)."""

from __future__ import annotations

import time
from collections import defaultdict

from chaos.cluster import KafkaCluster
from chaos.load import BackgroundLoad
from chaos.oracle import EventReader, Verdict
from chaos.scenarios import Scenario
from chaos.scenarios.common import bodies, settle_and_judge, sink_server
from chaos.stack import API_KEY, ChaosStack, started
from tests.support.smtp_server import RunningSmtpServer, SmtpScript


def _stack(scenario: str, cluster: KafkaCluster, sink: RunningSmtpServer) -> ChaosStack:
    stack = ChaosStack(
        scenario,
        bootstrap=cluster.bootstrap,
        replication_factor=cluster.replication_factor,
        env={"MAILRAIL_SMART_HOST": sink.address},
    )
    stack.add_ingest()
    stack.add_router()
    stack.add_sender("sender-0")
    return stack


def broker_outage(full: bool) -> Verdict:
    """1. The only broker stopped for 30 s (make test: 10 s) under HTTP load: every 202 was
    written and delivered, requests that could not be written got 503, nothing is lost."""
    outage_s = 30.0 if full else 10.0
    verdict = Verdict("1", f"ingest under a {outage_s:.0f} s broker outage")
    messages = 240 if full else 80
    spread_s = outage_s + 20.0
    with sink_server() as sink, KafkaCluster(1) as cluster:
        stack = _stack("s1", cluster, sink)
        with started(stack):
            load = BackgroundLoad(
                f"http://{stack.http_addr}",
                API_KEY,
                bodies("s1", messages, 2, 8),
                concurrency=4,
                deadline_s=spread_s + 120,
                spread_s=spread_s,
            ).start()
            time.sleep(5.0)
            down_at = time.time()
            cluster.stop_node(1)
            time.sleep(outage_s)
            cluster.start_node(1)
            back_at = time.time()
            result = load.join()
            settle_and_judge(
                verdict, stack, result, [sink], timeout_s=240 if full else 150, fault_end=back_at
            )
            during = [
                a for a in result.accepted if down_at + 1.0 < a.at < back_at
            ]  # answered while the broker was down
            unexpected = {k: n for k, n in result.answers.items() if k not in ("202", "503")}
            verdict.check(
                "every request answered 202 or 503",
                not unexpected,
                f"answers {dict(result.answers)}",
            )
            verdict.check(
                "503 while the broker was down",
                result.answers.get("503", 0) > 0 and not during,
                f"{result.answers.get('503', 0)} × 503; {len(during)} × 202 answered "
                "while the broker was down",
            )
            first_after = min((a.at for a in result.accepted if a.at > back_at), default=None)
            verdict.note(
                f"answers {dict(result.answers)}; "
                f"{verdict.unconfirmed} recipients of 503'd requests were written all the same; "
                "first 202 after the restart: "
                + ("never" if first_after is None else f"{first_after - back_at:.1f} s")
            )
    return verdict


def _aborted_records(stack: ChaosStack, name: str) -> int:
    """Records in the log that no `read_committed` reader sees (aborted transactions)."""
    counts = []
    for committed_only in (False, True):
        reader = EventReader(stack.bootstrap, stack.topic(name), committed_only=committed_only)
        try:
            reader.catch_up()
            counts.append(len(reader.positions))
        finally:
            reader.close()
    return counts[0] - counts[1]


def _byte_duplicates(stack: ChaosStack, name: str) -> tuple[int, int, str]:
    """(records, records whose key and value are byte-identical to an earlier one at another
    offset, where the twins are: `partition@offset` of each pair, first ten)."""
    reader = EventReader(stack.bootstrap, stack.topic(name))
    try:
        reader.catch_up()
        where: dict[tuple[bytes | None, bytes | None], set[tuple[int, int]]] = defaultdict(set)
        for (key, value, _), position in zip(reader.raw, reader.positions, strict=True):
            where[(key, value)].add(position)
        twins = [sorted(p) for p in where.values() if len(p) > 1]
        shown = " ".join("/".join(f"{p}@{o}" for p, o in pair) for pair in twins[:10])
        return len(set(reader.positions)), sum(len(p) - 1 for p in twins), shown
    finally:
        reader.close()


def leader_kills(full: bool) -> Verdict:
    """2. Three brokers (RF 3, min.insync.replicas 2, no unclean election); the leader of a
    busy partition `kill -9`'d five times under load: 0 acknowledged records lost, 0 duplicate
    records on the internal topics (the idempotent producer is on)."""
    kills = 5 if full else 2
    verdict = Verdict("2", f"3 brokers, leader kill -9 ×{kills}")
    messages = 600 if full else 120
    spread_s = kills * 16.0 + 10.0
    with sink_server(SmtpScript(reply_delay_s=0.002)) as sink, KafkaCluster(3) as cluster:
        stack = _stack("s2", cluster, sink)
        with started(stack):
            load = BackgroundLoad(
                f"http://{stack.http_addr}",
                API_KEY,
                bodies("s2", messages, 5, 16),
                concurrency=4,
                deadline_s=spread_s + 180,
                spread_s=spread_s,
            ).start()
            accepted = stack.topic("mail.accepted")
            victims = []
            for round_ in range(kills):
                time.sleep(4.0)
                leader = cluster.leader_of(accepted, round_ % 8)
                victims.append(leader)
                cluster.kill(leader)
                time.sleep(8.0)
                cluster.start_node(leader)
                deadline = time.monotonic() + 90
                while not cluster.in_sync(accepted) and time.monotonic() < deadline:
                    time.sleep(1.0)
            fault_end = time.time()
            result = load.join()
            settle_and_judge(
                verdict, stack, result, [sink], timeout_s=300 if full else 150, fault_end=fault_end
            )
            duplicates = {}
            for name in ("mail.accepted", "mail.outbound.default", "mail.events", "mail.ledger"):
                duplicates[name] = _byte_duplicates(stack, name)
            verdict.check(
                "0 duplicate records on the internal topics",
                all(twins == 0 for _, twins, _ in duplicates.values()),
                "; ".join(
                    f"{n}: {t} records, {d} byte-identical twins" + (f" ({at})" if at else "")
                    for n, (t, d, at) in duplicates.items()
                ),
            )
            verdict.check(
                "nothing sent twice", verdict.dup_sink == 0, f"{verdict.dup_sink} duplicates"
            )
            aborted = {n: _aborted_records(stack, n) for n in ("mail.accepted", "mail.events")}
            verdict.note(
                f"killed leaders {victims}; answers {dict(result.answers)}; "
                f"{verdict.extra_events} events written again (records processed twice); "
                "records of aborted ingest transactions (in the log, read by no one): "
                + ", ".join(f"{n} {c}" for n, c in aborted.items())
            )
    return verdict


SCENARIOS = [
    Scenario(1, "ingest under a broker outage", broker_outage),
    Scenario(2, "3 brokers, leader kill -9", leader_kills, chaos_only=True),
]
