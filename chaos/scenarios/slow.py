"""Slow receiving servers: scenarios 7 and 12. Minutes each, so `make chaos` only."""

from __future__ import annotations

from chaos.load import post_sync
from chaos.netfault import Mode, fault_proxy
from chaos.oracle import Verdict
from chaos.scenarios import Scenario
from chaos.scenarios.common import (
    accepted_everything,
    bodies,
    relay_stack,
    settle_and_judge,
    sink_server,
)
from chaos.stack import API_KEY, ChaosStack, started

#: Past the consumer's max.poll.interval.ms (300 s): a loop that stopped polling while it
#: waits would be evicted from its group.
SLOW_DOT_S = 310.0
#: RFC 5321 gives RCPT 5 minutes; a library default of 60 s would give up.
SLOW_RCPT_S = 290.0


def _group_events(stack: ChaosStack, member: str) -> list[str]:
    return [
        line
        for line in stack.log_lines(member)
        if any(word in line for word in ('"revoked"', '"partitions lost"', "session timed out"))
    ]


def _slow(number: str, title: str, mode: Mode, delay_s: float, full: bool) -> Verdict:
    verdict = Verdict(number, title)
    messages = 4 if full else 2
    with sink_server() as sink, fault_proxy((sink.host, sink.port), mode, delay_s) as proxy:
        stack = relay_stack(f"s{number}", sink=proxy)
        with started(stack):
            load = post_sync(
                f"http://{stack.http_addr}", API_KEY, bodies(f"s{number}", messages, 1, messages)
            )
            accepted_everything(verdict, load, messages)
            settle_and_judge(verdict, stack, load, [sink], timeout_s=delay_s * 2 + 120)
            verdict.check(
                f"every reply held {delay_s:.0f} s",
                proxy.stats.held >= messages and proxy.stats.held_s >= delay_s * messages * 0.99,
                f"{proxy.stats.held} replies held {proxy.stats.held_s:.0f} s in all",
            )
            verdict.check("delivered once", verdict.dup_sink == 0, f"{verdict.dup_sink} duplicates")
            churn = _group_events(stack, "sender-0")
            verdict.check(
                "no eviction from the consumer group (polling went on)",
                not churn,
                f"{len(churn)} revoke/lost lines: {[c[:160] for c in churn[:2]]}",
            )
    return verdict


def slow_final_dot(full: bool) -> Verdict:
    """7. A receiving server that answers the final dot after 310 s (past the consumer's
    max.poll.interval.ms): no consumer-group eviction, no duplicate."""
    return _slow("7", "final dot answered after 310 s", "slow-dot", SLOW_DOT_S, full)


def slow_rcpt(full: bool) -> Verdict:
    """12. RFC 5321 timeouts in force: a server that waits 290 s before answering RCPT
    still gets the mail (a library's 60 s default would have given up)."""
    return _slow("12", "RCPT answered after 290 s", "slow-rcpt", SLOW_RCPT_S, full)


SCENARIOS = [
    Scenario(7, "final dot answered after 310 s", slow_final_dot, chaos_only=True),
    Scenario(12, "RCPT answered after 290 s", slow_rcpt, chaos_only=True),
]
