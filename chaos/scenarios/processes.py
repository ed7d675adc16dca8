"""Kafka and processes: scenarios 3, 4, 5, 6, 8 and 20 (services killed, crashed, scaled)."""

from __future__ import annotations

import random
import time

from chaos.load import BackgroundLoad, post_sync
from chaos.oracle import EventReader, Verdict, final_types
from chaos.scenarios import Scenario
from chaos.scenarios.common import (
    accepted_everything,
    bodies,
    relay_stack,
    settle_and_judge,
    sink_server,
)
from chaos.stack import API_KEY, ChaosStack, started
from schemas.records import EventType, LedgerEntry
from services.sender.ledger import CRASH_EXIT_STATUS
from tests.support.smtp_server import ReceivedMessage, RunningSmtpServer, SmtpScript

KILL_INTERVAL_S = 2.0


def sender_kill9(full: bool) -> Verdict:
    """3. Sender `kill -9` every 2 s under load, several senders: 0 lost; duplicates reported."""
    verdict = Verdict("3", "sender kill -9 every 2 s")
    senders, messages, per_message, kill_for_s = (3, 500, 20, 40.0) if full else (2, 40, 20, 6.0)
    rng = random.Random(3)
    # A little latency per reply, so that kills land while mail is in flight.
    with sink_server(SmtpScript(reply_delay_s=0.002)) as sink:
        stack = relay_stack("s3", sink, senders=senders)
        with started(stack):
            load = BackgroundLoad(
                f"http://{stack.http_addr}",
                API_KEY,
                bodies("s3", messages, per_message, 16),
                concurrency=8,
                deadline_s=300,
                spread_s=kill_for_s,
            ).start()
            names = [n for n in stack.members if n.startswith("sender-")]
            kills = 0
            end = time.monotonic() + kill_for_s
            time.sleep(1.0)
            while time.monotonic() < end:
                victim = names[rng.randrange(len(names))]
                stack.kill(victim)
                kills += 1
                stack.start(victim, wait=False)
                time.sleep(KILL_INTERVAL_S)
            fault_end = time.time()
            result = load.join()
            stack.start(*names)
            accepted_everything(verdict, result, messages)
            settle_and_judge(
                verdict, stack, result, [sink], timeout_s=240 if full else 120, fault_end=fault_end
            )
            verdict.note(
                f"{senders} senders, {kills} kills; {verdict.dup_sink} duplicates at the sink "
                f"({verdict.dup_sink / max(1, verdict.accepted):.2%})"
            )
    return verdict


def window_250(full: bool) -> list[Verdict]:
    """4. The 250→commit window, forced by the sender's crash hook: a crash right after the
    remote 250 and before its ledger write sends that recipient again (exactly the expected
    duplicates); a crash after the ledger write sends nothing again."""
    slots, crashes = (4, 500) if full else (2, 8)
    with sink_server() as sink:
        stack = relay_stack(
            "s4",
            sink,
            senders=slots,
            static=True,
            # One batch at a time per sender: at a crash, one transaction is in its window.
            sender_env={"MAILRAIL_MAX_IN_FLIGHT": "1"},
        )
        with started(stack):
            reader = EventReader(stack.bootstrap, stack.topic("mail.events"))
            try:
                return [
                    _crash_phase(stack, sink, reader, point, crashes, full)
                    for point in ("before-ledger", "after-ledger")
                ]
            finally:
                reader.close()


def _crash_phase(
    stack: ChaosStack,
    sink: RunningSmtpServer,
    reader: EventReader,
    point: str,
    target: int,
    full: bool,
) -> Verdict:
    letter = "a" if point == "before-ledger" else "b"
    verdict = Verdict(f"4{letter}", f"crash after 250, {point}")
    rng = random.Random(4)
    names = [n for n in stack.members if n.startswith("sender-")]
    tag = f"s4{letter}"
    # Each life delivers 1 to 4 new recipients before its crash: enough mail for the target.
    per_message = 5
    messages = max(4, target * 5 // per_message)

    def arm(name: str) -> None:
        stack.set_env(
            name,
            MAILRAIL_TEST_CRASH_AFTER_250=str(rng.randint(2, 5)),
            MAILRAIL_TEST_CRASH_POINT=point,
        )
        stack.start(name, wait=False)

    # Armed before the load goes in: unarmed senders would deliver it before any crash.
    for name in names:
        stack.terminate(name)
        arm(name)
    load = post_sync(
        f"http://{stack.http_addr}",
        API_KEY,
        bodies(tag, messages, per_message, 16),
        concurrency=8,
    )
    accepted_everything(verdict, load, messages)
    pairs = load.pairs
    crashes = other_exits = 0
    deadline = time.monotonic() + (1800 if full else 150)
    last_poll = 0.0
    while crashes < target and time.monotonic() < deadline:
        for name in names:
            code = stack.reap(name)
            if code is None:
                continue
            if code == CRASH_EXIT_STATUS:
                crashes += 1
            else:
                other_exits += 1
            arm(name)
        if time.monotonic() - last_poll > 1.0:
            last_poll = time.monotonic()
            reader.poll(0.1)
            if pairs <= set(final_types(reader.events)):
                break  # the load is all delivered: no more crashes to be had
        time.sleep(0.05)
    fault_end = time.time()
    for name in names:
        if stack.members[name].running:
            stack.kill(name)
        stack.set_env(name, MAILRAIL_TEST_CRASH_AFTER_250=None, MAILRAIL_TEST_CRASH_POINT=None)
    stack.start(*names)
    phase_sink = _only(sink, {r for _, r in pairs})
    settle_and_judge(
        verdict, stack, load, [phase_sink], timeout_s=300 if full else 90, fault_end=fault_end
    )
    records = [c for c in stack.crash_records("sender-") if c.get("point") == point]
    verdict.check("crash hook fired", crashes >= min(target, 3), f"{crashes} crashes")
    verdict.check("no other exits", other_exits == 0, f"{other_exits} other exits")
    # Expected duplicates, exactly: the recipient of each before-ledger crash (its ledger
    # write never started), plus every ledger write unacknowledged at a crash that never
    # reached the topic (a write of the same key after the crash is the resend's own).
    unacked = {
        (k, float(c["at"])) for c in records for k in c.get("unacked_keys", "").split(",") if k
    }
    written = ledger_writes(stack)
    lost_writes = [k for k, at in unacked if not any(ts <= at for ts in written.get(k, []))]
    expected = (len(records) if point == "before-ledger" else 0) + len(lost_writes)
    verdict.check(
        "duplicates exactly as expected",
        verdict.dup_sink == expected,
        f"{verdict.dup_sink} duplicates, expected {expected}: {len(records)} crashes {point}, "
        f"{len(unacked)} ledger writes unacknowledged at the crashes, "
        f"{len(lost_writes)} of them never written",
    )
    verdict.note(
        f"{point}: {len(records)} crashes over {len(names)} senders, "
        f"{verdict.dup_sink} duplicates ({len(unacked)} ledger writes in flight at the crashes, "
        f"{len(unacked) - len(lost_writes)} of them landed)"
    )
    return verdict


def ledger_writes(stack: ChaosStack) -> dict[str, list[float]]:
    """Key → when each of its `mail.ledger` records was made (the entry's `ts`)."""
    reader = EventReader(stack.bootstrap, stack.topic("mail.ledger"))
    try:
        reader.catch_up()
        found: dict[str, list[float]] = {}
        for key, value, _ in reader.raw:
            if key is not None and value is not None:
                entry = LedgerEntry.model_validate_json(value)
                found.setdefault(key.decode(), []).append(entry.ts.timestamp())
        return found
    finally:
        reader.close()


class _FilteredSink:
    """The messages of one sink whose recipients are in a set (one phase's mail)."""

    def __init__(self, sink: RunningSmtpServer, recipients: set[str]) -> None:
        self._sink = sink
        self._wanted = {r.lower() for r in recipients}

    def _mine(self, messages: list[ReceivedMessage]) -> list[ReceivedMessage]:
        return [m for m in messages if any(r.lower() in self._wanted for r in m.rcpt_tos)]

    @property
    def messages(self) -> list[ReceivedMessage]:
        return self._mine(self._sink.messages)

    @property
    def unanswered(self) -> list[ReceivedMessage]:
        return self._mine(self._sink.unanswered)


def _only(sink: RunningSmtpServer, recipients: set[str]) -> RunningSmtpServer:
    return _FilteredSink(sink, recipients)  # type: ignore[return-value]


def exception_on_record(full: bool) -> list[Verdict]:
    """5. An unexpected exception on record k stops the service without committing k; after
    the restart k is processed again and nothing after it is skipped (or sent twice)."""
    verdicts = []
    messages = 60 if full else 20
    for service in ("sender", "router"):
        verdict = Verdict(f"5{service[0]}", f"exception on record k, {service}")
        k = messages // 2
        with sink_server(SmtpScript(reply_delay_s=0.002)) as sink:
            stack = relay_stack("s5", sink)
            fault = {
                "CHAOS_FAIL_ON_SUBJECT": f"chaos s5{service[0]} {k}",
                "CHAOS_FAIL_MARKER": str(stack.dir / "fault-tripped"),
            }
            victim = "sender-0" if service == "sender" else "router"
            stack.set_env(victim, **fault)
            _via_member(stack, victim)
            with started(stack):
                # One destination: every record on one partition, k in the middle.
                load = post_sync(
                    f"http://{stack.http_addr}",
                    API_KEY,
                    bodies(f"s5{service[0]}", messages, 3, 1),
                    concurrency=1,
                )
                accepted_everything(verdict, load, messages)
                exited = _wait_exit(stack, victim, 60)
                verdict.check(
                    f"the {service} stopped on record k",
                    exited == 2 and (stack.dir / "fault-tripped").exists(),
                    f"exit status {exited}",
                )
                fault_end = time.time()
                stack.start(victim)
                settle_and_judge(verdict, stack, load, [sink], timeout_s=120, fault_end=fault_end)
                verdict.check(
                    "nothing sent twice", verdict.dup_sink == 0, f"{verdict.dup_sink} duplicates"
                )
                k_rcpts = [r for a in load.accepted for r, _ in a.recipients if f"r{k}-" in r]
                verdict.check(
                    "record k processed again after the restart",
                    all(len(sink.messages_for(r)) == 1 for r in k_rcpts) and bool(k_rcpts),
                    f"record k's recipients arrived {[len(sink.messages_for(r)) for r in k_rcpts]}",
                )
        verdicts.append(verdict)
    return verdicts


def _via_member(stack: ChaosStack, name: str) -> None:
    """Run the member through chaos/member.py (its CHAOS_* variables were set after adding)."""
    process = stack.members[name].process
    if process.module != "chaos.member":
        process.args = [process.module, *process.args]
        process.module = "chaos.member"


def _wait_exit(stack: ChaosStack, name: str, timeout_s: float) -> int | None:
    popen = stack.members[name].process.popen
    assert popen is not None
    try:
        code = popen.wait(timeout_s)
    except Exception:
        return None
    stack.members[name].ends.append(f"exit {code}")
    return code


def rebalance_churn(full: bool) -> Verdict:
    """6. Senders scaled 1→4→2 (make test: 1→3→2) under load, the scale-down by SIGTERM and
    SIGKILL (make test: SIGTERM only): 0 lost, and every duplicate was first sent by a member
    that was killed (graceful members drain and commit on revoke)."""
    steps = "1→4→2, SIGTERM+SIGKILL" if full else "1→3→2, SIGTERM"
    verdict = Verdict("6", f"rebalance churn {steps}")
    slots, messages, per_message, spread_s = (4, 300, 20, 40.0) if full else (3, 60, 10, 14.0)
    with sink_server(SmtpScript(reply_delay_s=0.002)) as sink:
        stack = relay_stack("s6", sink, senders=slots)
        names = [n for n in stack.members if n.startswith("sender-")]
        with stack:
            stack.start("ingest", "router", names[0])
            load = BackgroundLoad(
                f"http://{stack.http_addr}",
                API_KEY,
                bodies("s6", messages, per_message, 16),
                concurrency=8,
                deadline_s=300,
                spread_s=spread_s,
            ).start()
            time.sleep(spread_s / 4)
            stack.start(*names[1:])  # scale up
            time.sleep(spread_s / 4)
            stopped: dict[str, str] = {}
            took: list[str] = []
            code, seconds = stack.terminate(names[1])  # scale down, gracefully...
            stopped[names[1]] = "sigterm"
            took.append(f"{names[1]} SIGTERM: exit {code} in {seconds:.1f} s")
            if full:
                stack.kill(names[2])  # ... and not
                stopped[names[2]] = "sigkill"
            fault_end = time.time()
            result = load.join()
            accepted_everything(verdict, result, messages)
            join = settle_and_judge(
                verdict, stack, result, [sink], timeout_s=240 if full else 120, fault_end=fault_end
            )
            by_address = {stack.members[n].address: n for n in names}
            culprits: list[str] = []
            for recipient, count in join.arrivals.items():
                if count < 2:
                    continue
                first = min(sink.messages_for(recipient), key=lambda m: m.received_at)
                sender = by_address.get(first.peer[0], first.peer[0])
                culprits.append(sender)
            graceful = [c for c in culprits if "sigkill" not in stack.members[c].ends]
            verdict.check(
                "duplicates only from killed members",
                not graceful,
                f"{len(culprits)} duplicates, first sent by {sorted(set(culprits)) or 'nobody'}"
                f"; ends: { {n: stack.members[n].ends for n in names} }",
            )
            verdict.check("graceful stop exits 0", code == 0, "; ".join(took))
            verdict.note(f"{steps}: {verdict.dup_sink} duplicates; " + "; ".join(took))
    return verdict


def kill_others(full: bool) -> Verdict:
    """8. Router, ingest and bounce each `kill -9`'d under load (and restarted): 0 lost,
    0 duplicates at the sink (a batch routed twice is caught by the delivery ledger)."""
    verdict = Verdict("8", "router, ingest, bounce kill -9")
    messages, per_message, spread_s = (400, 10, 40.0) if full else (60, 5, 12.0)
    with sink_server(SmtpScript(reply_delay_s=0.002)) as sink:
        stack = relay_stack("s8", sink, senders=1, bounce=True)
        with started(stack):
            tag = "s8"
            batch_bodies = bodies(tag, messages, per_message, 16)
            # Every tenth message has a recipient the sink refuses: work for bounce.
            for index, body in enumerate(batch_bodies):
                if index % 10 == 0:
                    body["to"][0] = f"bounce-{index}-{tag}@d{index % 16}.chaos.example"
            load = BackgroundLoad(
                f"http://{stack.http_addr}",
                API_KEY,
                batch_bodies,
                concurrency=4,
                deadline_s=300,
                spread_s=spread_s,
            ).start()
            for victim in ("router", "ingest", "bounce"):
                time.sleep(spread_s / 4)
                stack.kill(victim)
                stack.start(victim, wait=victim == "ingest")
            fault_end = time.time()
            result = load.join()
            stack.start()
            expect = {
                r: EventType.BOUNCED
                for a in result.accepted
                for r, _ in a.recipients
                if r.startswith("bounce-")
            }
            settle_and_judge(
                verdict,
                stack,
                result,
                [sink],
                timeout_s=240 if full else 120,
                fault_end=fault_end,
                expect=expect,
            )
            verdict.check(
                "no duplicate at the sink", verdict.dup_sink == 0, f"{verdict.dup_sink} duplicates"
            )
            lost_requests = sum(n for k, n in result.answers.items() if k != "202")
            verdict.note(
                f"answers {dict(result.answers)}; {verdict.unconfirmed} recipients delivered "
                f"without a 2xx to their request (written before ingest died: {lost_requests} "
                f"requests failed)"
            )
    return verdict


def sigterm_everything(full: bool) -> Verdict:
    """20. SIGTERM under load on every service in turn (each restarted): each drains and
    exits 0 within its grace period (90 s, deploy/k8s), nothing lost, nothing sent twice."""
    verdict = Verdict("20", "SIGTERM under load, every service")
    messages, per_message, spread_s = (400, 10, 40.0) if full else (60, 5, 14.0)
    grace_s = 90.0
    with sink_server(SmtpScript(reply_delay_s=0.002)) as sink:
        stack = relay_stack("s20", sink, senders=1, bounce=True)
        with started(stack):
            load = BackgroundLoad(
                f"http://{stack.http_addr}",
                API_KEY,
                bodies("s20", messages, per_message, 16),
                concurrency=4,
                deadline_s=300,
                spread_s=spread_s,
            ).start()
            times = []
            for victim in ("sender-0", "router", "bounce", "ingest"):
                time.sleep(spread_s / 5)
                code, seconds = stack.terminate(victim, grace_s)
                times.append(f"{victim}: exit {code} in {seconds:.1f} s")
                verdict.check(
                    f"{victim} drains and exits within {grace_s:.0f} s",
                    code == 0 and seconds < grace_s,
                    f"exit {code} in {seconds:.1f} s",
                )
                stack.start(victim, wait=victim == "ingest")
            fault_end = time.time()
            result = load.join()
            stack.start()
            settle_and_judge(
                verdict, stack, result, [sink], timeout_s=240 if full else 120, fault_end=fault_end
            )
            verdict.check(
                "nothing sent twice", verdict.dup_sink == 0, f"{verdict.dup_sink} duplicates"
            )
            verdict.note("; ".join(times) + f"; answers {dict(result.answers)}")
    return verdict


SCENARIOS = [
    Scenario(3, "sender kill -9 every 2 s", sender_kill9),
    Scenario(4, "the 250→commit window, forced", window_250),
    Scenario(5, "exception on record k, restart", exception_on_record),
    Scenario(6, "rebalance churn", rebalance_churn),
    Scenario(8, "router, ingest, bounce kill -9", kill_others),
    Scenario(20, "SIGTERM under load, every service", sigterm_everything),
]
