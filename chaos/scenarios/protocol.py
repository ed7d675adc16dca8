"""SMTP and DNS: scenarios 9, 10, 11, 14 and 15 (what the receiving side does wrong)."""

from __future__ import annotations

from typing import Any

from chaos.load import post_sync
from chaos.netfault import Mode, fault_proxy
from chaos.oracle import EventReader, Verdict, wait_final
from chaos.scenarios import Scenario
from chaos.scenarios.common import (
    accepted_everything,
    bodies,
    relay_stack,
    settle_and_judge,
    sink_server,
    wait_until,
)
from chaos.stack import API_KEY, BASE_RULES, ChaosStack, free_port, started
from schemas.records import DeliveryEvent, EventType
from tests.support.dns_server import NULL_MX, start_dns_server
from tests.support.smtp_server import RunningSmtpServer, SmtpScript, start_smtp_server


def _events_of(reader: EventReader, recipient: str) -> list[DeliveryEvent]:
    return [e for e in reader.events if e.recipient == recipient]


def _broken_transaction(number: str, mode: Mode, full: bool) -> Verdict:
    """9 and 10: one broken transaction per recipient through the fault proxy, then healthy."""
    title = "cut at 50% of DATA" if mode == "cut" else "no reply to the final dot"
    verdict = Verdict(number, title)
    messages = 40 if full else 6
    with sink_server() as sink, fault_proxy((sink.host, sink.port), mode) as proxy:
        stack = relay_stack(f"s{number}", proxy, senders=1)
        with started(stack):
            load = post_sync(
                f"http://{stack.http_addr}", API_KEY, bodies(f"s{number}", messages, 2, 4)
            )
            accepted_everything(verdict, load, messages)
            settle_and_judge(verdict, stack, load, [sink], timeout_s=120, include_unanswered=True)
            reader = EventReader(stack.bootstrap, stack.topic("mail.events"))
            try:
                reader.catch_up()
                broken = set(proxy.stats.cut if mode == "cut" else proxy.stats.swallowed)
                rcpts = {r for _, r in load.pairs}
                deferred_first = [
                    r
                    for r in rcpts
                    if any(
                        e.type is EventType.DEFERRED and e.smtp and e.smtp.code == 451
                        for e in _events_of(reader, r)
                    )
                ]
                bounced = [
                    r
                    for r in rcpts
                    if any(e.type is EventType.BOUNCED for e in _events_of(reader, r))
                ]
                retried = [
                    r
                    for r in rcpts
                    if any(
                        e.type is EventType.DELIVERED and e.attempt >= 2
                        for e in _events_of(reader, r)
                    )
                ]
            finally:
                reader.close()
            verdict.check(
                "every recipient's first transaction was broken",
                broken == {r.lower() for r in rcpts},
                f"{len(broken)} of {len(rcpts)}",
            )
            verdict.check(
                "deferred, then retried and delivered",
                len(deferred_first) == len(rcpts) == len(retried),
                f"{len(deferred_first)} deferred, {len(retried)} delivered on a retry",
            )
            verdict.check("never bounced", not bounced, f"{len(bounced)} bounced")
            arrivals = {r: len(sink.messages_for(r)) for r in rcpts}
            if mode == "cut":
                verdict.check(
                    "delivered exactly once",
                    set(arrivals.values()) == {1} and verdict.dup_sink == 0,
                    f"arrivals per recipient {sorted(set(arrivals.values()))}",
                )
                verdict.note(
                    f"{verdict.flagged} of {len(rcpts)} deferrals flagged 'possible duplicate': "
                    "the sender cannot tell a cut during DATA from a lost reply to the dot"
                )
            else:
                verdict.check(
                    "the duplicate is counted and flagged",
                    verdict.dup_sink == len(rcpts) and verdict.flagged == len(rcpts),
                    f"{verdict.dup_sink} duplicates at the sink, {verdict.flagged} flagged",
                )
    return verdict


def cut_mid_data(full: bool) -> Verdict:
    """9. Connection cut at 50% of DATA: deferred, retried, delivered once, never bounced."""
    return _broken_transaction("9", "cut", full)


def no_final_reply(full: bool) -> Verdict:
    """10. The server stores the message and drops the connection without answering the final
    dot: retried, and the possible duplicate is flagged in its event (RFC 1047)."""
    return _broken_transaction("10", "swallow", full)


SHARED_RULES: dict[str, Any] = {
    **BASE_RULES,
    "pools": [{"name": "default", "ehlo": "sender.chaos.test", "verp": False}],
}


def mixed_replies(full: bool) -> Verdict:
    """11. 421 at the greeting, then one transaction with mixed RCPT replies (250, 250,
    452 4.5.3, 451, 550 5.1.1): each recipient in its right state, the 452 and 451 ones
    retried alone, and DATA never sent when every RCPT failed."""
    verdict = Verdict("11", "421 greeting; mixed RCPT replies")
    once: set[str] = set()

    def replies(address: str) -> str | None:
        local = address.split("@")[0]
        if local.startswith("hard"):
            return "550 5.1.1 no such user"
        for prefix, reply in (
            ("tmp452", "452 4.5.3 too many recipients"),
            ("tmp451", "451 4.3.0 try again"),
        ):
            if local.startswith(prefix):
                if address in once:
                    return None
                once.add(address)
                return reply
        return None

    # Without PIPELINING, so that "no DATA" is visible: pipelined, the DATA verb travels with
    # MAIL and RCPT (RFC 2920) and the server refuses it; the body is never sent either way.
    healthy = SmtpScript(replies=replies, default_convention=False, advertise_pipelining=False)
    with sink_server(SmtpScript(greeting="421 4.7.0 busy, try later")) as sink:
        stack = relay_stack(
            "s11",
            sink,
            rules=SHARED_RULES,
            env={"MAILRAIL_RETRY_SCHEDULE_S": "[5, 2, 2]"},
        )
        with started(stack):
            tag = "s11"
            mixed = [
                f"{p}-{tag}@mixed.chaos.example"
                for p in ("ok1", "ok2", "tmp452", "tmp451", "hard1")
            ]
            refused = [f"{p}-{tag}@refused.chaos.example" for p in ("hard2", "hard3")]
            load = post_sync(
                f"http://{stack.http_addr}",
                API_KEY,
                [
                    {"from": "c@acme.example", "to": mixed, "subject": "mixed", "text": "m"},
                    {"from": "c@acme.example", "to": refused, "subject": "refused", "text": "r"},
                ],
            )
            accepted_everything(verdict, load, 2)
            reader = EventReader(stack.bootstrap, stack.topic("mail.events"))
            try:
                # Every recipient deferred by the 421 greeting, then the server recovers.
                def all_deferred() -> bool:
                    reader.poll(0.1)
                    return all(
                        any(e.type is EventType.DEFERRED for e in _events_of(reader, r))
                        for r in mixed + refused
                    )

                greeted = wait_until(all_deferred, 30)
                greeting_codes = {
                    e.smtp.code
                    for r in mixed + refused
                    for e in _events_of(reader, r)
                    if e.type is EventType.DEFERRED and e.smtp is not None
                }
                sink.set_script(healthy)
                data_before = sink.stats.data_commands
            finally:
                reader.close()
            verdict.check(
                "421 at the greeting defers everyone",
                greeted and greeting_codes == {421},
                f"codes {sorted(greeting_codes)}",
            )
            expect = {r: EventType.DELIVERED for r in mixed[:4]} | {
                r: EventType.BOUNCED for r in [mixed[4], *refused]
            }
            settle_and_judge(verdict, stack, load, [sink], timeout_s=60, expect=expect)
            transactions = [sorted(m.rcpt_tos) for m in sink.messages]
            verdict.check(
                "the 452 and 451 recipients retried alone",
                sorted([mixed[2], mixed[3]]) in transactions and sorted(mixed[:2]) in transactions,
                f"transactions {transactions}",
            )
            verdict.check(
                "DATA never sent when every RCPT failed",
                sink.stats.data_commands - data_before == 2,
                f"{sink.stats.data_commands - data_before} DATA commands for 2 transactions "
                "with an accepted recipient",
            )
    return verdict


def _mx_stack(
    scenario: str, dns_address: str, port: int, env: dict[str, str] | None = None
) -> ChaosStack:
    stack = ChaosStack(
        scenario,
        env={
            "MAILRAIL_DNS": dns_address,
            "MAILRAIL_SMTP_PORT": str(port),
            **(env or {}),
        },
    )
    stack.add_ingest()
    stack.add_router()
    stack.add_sender("sender-0")
    return stack


def _servers(port: int, scripts: dict[str, SmtpScript | None]) -> dict[str, RunningSmtpServer]:
    started_: dict[str, RunningSmtpServer] = {}
    try:
        for host, script in scripts.items():
            started_[host] = start_smtp_server(host, port, script)
    except BaseException:
        for server in started_.values():
            server.stop()
        raise
    return started_


def dns_matrix(full: bool) -> Verdict:
    """14. NXDOMAIN bounces (5.1.2); SERVFAIL and timeouts defer; no MX but an A record is
    delivered to the A host; an MX without address defers; null MX bounces (5.1.10) without
    a connection; a refusing primary MX falls back to the secondary."""
    verdict = Verdict("14", "DNS matrix")
    port = free_port("127.0.0.21")
    servers = _servers(port, {"127.0.0.21": None, "127.0.0.23": None})
    dns = start_dns_server(
        {
            "nx.chaos.example": "NXDOMAIN",
            "servfail.chaos.example": "SERVFAIL",
            "timeout.chaos.example": {"MX": "TIMEOUT"},
            "a-only.chaos.example": {"A": ["127.0.0.21"]},
            "noaddr.chaos.example": {"MX": [(10, "mx.noaddr.chaos.example")]},
            "mx.noaddr.chaos.example": {"TXT": ["no address here"]},
            "nullmx.chaos.example": {"MX": NULL_MX},
            "fallback.chaos.example": {
                "MX": [(10, "mx1.fallback.chaos.example"), (20, "mx2.fallback.chaos.example")]
            },
            # Nothing listens on the primary's address: connection refused.
            "mx1.fallback.chaos.example": {"A": ["127.0.0.22"]},
            "mx2.fallback.chaos.example": {"A": ["127.0.0.23"]},
        }
    )
    try:
        stack = _mx_stack("s14", dns.address, port, {"MAILRAIL_MAX_AGE_S": "12"})
        with started(stack):
            want = {
                "nx": EventType.BOUNCED,
                "servfail": EventType.EXPIRED,
                "timeout": EventType.EXPIRED,
                "a-only": EventType.DELIVERED,
                "noaddr": EventType.EXPIRED,
                "nullmx": EventType.BOUNCED,
                "fallback": EventType.DELIVERED,
            }
            rcpt = {d: f"user-s14@{d}.chaos.example" for d in want}
            load = post_sync(
                f"http://{stack.http_addr}",
                API_KEY,
                [
                    {"from": "c@acme.example", "to": [r], "subject": d, "text": "dns"}
                    for d, r in rcpt.items()
                ],
            )
            accepted_everything(verdict, load, len(rcpt))
            expect = {rcpt[d]: kind for d, kind in want.items()}
            sinks = list(servers.values())
            connections_before = sum(s.stats.connections for s in sinks)
            reader = EventReader(stack.bootstrap, stack.topic("mail.events"))
            try:
                wait_final(reader, load.pairs, 90)
                codes = {
                    d: sorted(
                        {
                            f"{e.type.value} {e.smtp.code} {e.smtp.enhanced}"
                            for e in _events_of(reader, rcpt[d])
                            if e.smtp is not None
                        }
                    )
                    for d in want
                }
                mx_of = {
                    d: {e.mx for e in _events_of(reader, rcpt[d]) if e.type is EventType.DELIVERED}
                    for d in want
                }
            finally:
                reader.close()
            settle_and_judge(verdict, stack, load, sinks, timeout_s=10, expect=expect)
            verdict.check(
                "NXDOMAIN → 5.1.2",
                any("bounced 550 5.1.2" in c for c in codes["nx"]),
                str(codes["nx"]),
            )
            verdict.check(
                "SERVFAIL and timeout defer (4.4.3)",
                all(
                    any(c.endswith("451 4.4.3") and not c.startswith("bounced") for c in codes[d])
                    for d in ("servfail", "timeout")
                ),
                f"{codes['servfail']} / {codes['timeout']}",
            )
            verdict.check(
                "MX without address: error, deferred (4.4.4)",
                any(
                    c.endswith("451 4.4.4") and not c.startswith("bounced") for c in codes["noaddr"]
                ),
                str(codes["noaddr"]),
            )
            verdict.check(
                "null MX → 5.1.10",
                any("bounced 556 5.1.10" in c for c in codes["nullmx"]),
                str(codes["nullmx"]),
            )
            verdict.check(
                "no MX: delivered to the A host",
                len(servers["127.0.0.21"].messages_for(rcpt["a-only"])) == 1,
                f"mx {mx_of['a-only']}",
            )
            verdict.check(
                "refusing primary MX: the secondary is used",
                len(servers["127.0.0.23"].messages_for(rcpt["fallback"])) == 1
                and mx_of["fallback"] == {"mx2.fallback.chaos.example"},
                f"mx {mx_of['fallback']}",
            )
            connections = sum(s.stats.connections for s in sinks) - connections_before
            verdict.note(f"{connections} connections made after the load (2 deliveries)")
    finally:
        for server in servers.values():
            server.stop()
        dns.stop()
    return verdict


def size_and_utf8(full: bool) -> Verdict:
    """15. A message larger than the server's SIZE bounces 552 5.3.4 without DATA; a non-ASCII
    local part to a server without SMTPUTF8 bounces 5.6.7."""
    verdict = Verdict("15", "SIZE limit; SMTPUTF8 missing")
    port = free_port("127.0.0.31")
    servers = _servers(
        port,
        {
            "127.0.0.31": SmtpScript(max_size_bytes=2000),
            "127.0.0.32": SmtpScript(advertise_smtputf8=False),
        },
    )
    dns = start_dns_server(
        {
            "small.chaos.example": {"MX": [(10, "mx.small.chaos.example")]},
            "mx.small.chaos.example": {"A": ["127.0.0.31"]},
            "ascii.chaos.example": {"MX": [(10, "mx.ascii.chaos.example")]},
            "mx.ascii.chaos.example": {"A": ["127.0.0.32"]},
        }
    )
    try:
        stack = _mx_stack("s15", dns.address, port)
        with started(stack):
            big = "x" * 5000
            cases = {
                "big": ("big-s15@small.chaos.example", big, EventType.BOUNCED),
                "small": ("fits-s15@small.chaos.example", "tiny", EventType.DELIVERED),
                "utf8": ("jürgen-s15@ascii.chaos.example", "hi", EventType.BOUNCED),
                "ascii": ("plain-s15@ascii.chaos.example", "hi", EventType.DELIVERED),
            }
            load = post_sync(
                f"http://{stack.http_addr}",
                API_KEY,
                [
                    {"from": "c@acme.example", "to": [r], "subject": k, "text": text}
                    for k, (r, text, _) in cases.items()
                ],
            )
            verdict.check(
                "ingest accepted every case",
                load.answers.get("202") == len(cases),
                f"answers {dict(load.answers)}; refused: {[b['subject'] + ' ' + a for b, a in load.refused]}",
            )
            expect = {r: kind for r, _, kind in cases.values()}
            sinks = list(servers.values())
            reader = EventReader(stack.bootstrap, stack.topic("mail.events"))
            try:
                wait_final(reader, load.pairs, 60)
                replies = {
                    k: [
                        f"{e.smtp.code} {e.smtp.enhanced}"
                        for e in _events_of(reader, r)
                        if e.smtp is not None and e.type is EventType.BOUNCED
                    ]
                    for k, (r, _, _) in cases.items()
                }
            finally:
                reader.close()
            settle_and_judge(verdict, stack, load, sinks, timeout_s=10, expect=expect)
            verdict.check(
                "too large → 552 5.3.4 without DATA",
                replies["big"] == ["552 5.3.4"] and servers["127.0.0.31"].stats.data_commands == 1,
                f"{replies['big']}; DATA commands at the small server: "
                f"{servers['127.0.0.31'].stats.data_commands} (1 for the message that fits)",
            )
            verdict.check(
                "non-ASCII local part without SMTPUTF8 → 5.6.7",
                len(replies["utf8"]) == 1 and replies["utf8"][0].endswith("5.6.7"),
                str(replies["utf8"]),
            )
    finally:
        for server in servers.values():
            server.stop()
        dns.stop()
    return verdict


SCENARIOS = [
    Scenario(9, "cut at 50% of DATA", cut_mid_data),
    Scenario(10, "no reply to the final dot", no_final_reply),
    Scenario(11, "421 greeting; mixed RCPT replies", mixed_replies),
    Scenario(14, "DNS matrix", dns_matrix),
    Scenario(15, "SIZE limit; SMTPUTF8 missing", size_and_utf8),
]
