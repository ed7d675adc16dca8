"""SIGTERM a service mid-run and start it again: no accepted message is lost or sent twice."""

from __future__ import annotations

import collections

import pytest

from tests.integration.conftest import Stack, unique
from tests.support.kafka import EventLog

MESSAGES = 40


@pytest.mark.parametrize("service", ["sender", "router", "ingest", "bounce"])
def test_sigterm_and_restart_loses_nothing(stack: Stack, events: EventLog, service: str) -> None:
    recipients = [unique(f"restart-{service}") for _ in range(MESSAGES)]
    with stack.client() as client:
        for index, recipient in enumerate(recipients):
            if index == MESSAGES // 2:
                stack.services[service].stop()
                if service == "ingest":
                    stack.services[service].start().wait_ready()
            answer = client.post(
                "/v1/messages",
                json={
                    "from": "a@acme.example",
                    "to": [recipient],
                    "subject": f"{index}",
                    "text": "t",
                },
            )
            assert answer.status_code == 202, answer.text
    if service != "ingest":
        stack.services[service].start().wait_ready()
    wanted = set(recipients)

    def all_delivered(_: object) -> bool:
        done = {e.recipient for e in events.events() if e.type.value == "delivered"}
        return wanted <= done

    events.wait_for(all_delivered, timeout_s=90)
    arrivals = collections.Counter(
        r for m in stack.sink.messages for r in m.rcpt_tos if r in wanted
    )
    assert set(arrivals) == wanted
    assert max(arrivals.values()) == 1, "a graceful restart sent something twice"
