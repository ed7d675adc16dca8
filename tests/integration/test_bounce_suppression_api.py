"""`/v1/suppressions`: what an operator sees and changes, and what that does to the next message."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from schemas.records import suppression_key
from tests.integration.conftest import OTHER_KEY, Stack, topic, unique
from tests.support.kafka import TopicTail


@pytest.fixture(scope="module")
def suppression_topic(stack: Stack) -> Iterator[TopicTail]:
    tail = TopicTail(topic("mail.suppression"))
    yield tail
    tail.stop()


def send(stack: Stack, to: str) -> str:
    with stack.client() as client:
        answer = client.post(
            "/v1/messages", json={"from": "a@acme.example", "to": [to], "subject": "s", "text": "t"}
        )
    assert answer.status_code == 202, answer.text
    status: str = answer.json()["recipients"][0]["status"]
    return status


def test_add_read_remove_and_what_the_next_message_does(
    stack: Stack, suppression_topic: TopicTail
) -> None:
    address = unique("Manual.Entry", "Example.COM")
    normal = address.rpartition("@")[0] + "@example.com"
    with stack.client() as client:
        added = client.put(f"/v1/suppressions/{address}", json={"reason": "asked by phone"})
        assert added.status_code == 200
        entry = added.json()
        assert entry["email"] == normal and entry["tenant"] == "acme"
        assert entry["reason"] == "manual: asked by phone" and entry["created_at"]
        assert client.get(f"/v1/suppressions/{normal}").json() == entry, "the domain is case-blind"
    assert send(stack, normal) == "suppressed"
    with stack.client() as client:
        assert client.delete(f"/v1/suppressions/{normal}").status_code == 204
        gone = client.get(f"/v1/suppressions/{normal}")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
        assert client.delete(f"/v1/suppressions/{normal}").status_code == 404
    assert send(stack, normal) == "queued"
    key = suppression_key("acme", normal).encode()
    records = suppression_topic.wait_for(
        lambda rs: [r for r in rs if r.key() == key and r.value() is None], timeout_s=30
    )
    values = [r.value() for r in records if r.key() == key]
    assert values[0] is not None and values[-1] is None, "removal is a tombstone, after the entry"


def test_a_page_walk_lists_each_entry_once_in_address_order(stack: Stack) -> None:
    domain = f"list-{uuid.uuid4().hex[:8]}.example"
    mine = sorted(f"p{i:02d}@{domain}" for i in range(7))
    with stack.client() as client:
        for address in reversed(mine):
            assert client.put(f"/v1/suppressions/{address}").status_code == 200
        walked: list[dict[str, Any]] = []
        cursor = None
        for _ in range(10_000):
            params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
            page = client.get("/v1/suppressions", params=params).json()
            assert len(page["items"]) <= 3
            walked += page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    emails = [e["email"] for e in walked]
    assert emails == sorted(emails) and len(emails) == len(set(emails))
    assert [e for e in emails if e.endswith(domain)] == mine
    assert {e["tenant"] for e in walked} == {"acme"}, "only the caller's own entries"
    with stack.client(OTHER_KEY) as other:
        theirs = other.get("/v1/suppressions", params={"limit": 1000}).json()["items"]
    assert not [e for e in theirs if e["email"].endswith(domain)]


def test_bad_requests_are_json_errors(stack: Stack) -> None:
    with stack.client() as client:
        bad = client.put("/v1/suppressions/not-an-address")
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "email"
        assert client.get("/v1/suppressions", params={"limit": 0}).status_code == 400
    with stack.client("no-such-key") as stranger:
        assert stranger.get(f"/v1/suppressions/{unique()}").status_code == 401


def test_a_bounce_suppression_can_be_lifted(stack: Stack) -> None:
    """Hard bounce (the sink refuses `bounce-*`) → suppressed; DELETE → mailed again."""
    address = unique("bounce-lift")
    assert send(stack, address) == "queued"
    deadline = time.monotonic() + 30
    with stack.client() as client:
        while (found := client.get(f"/v1/suppressions/{address}")).status_code == 404:
            assert time.monotonic() < deadline, "the hard bounce never suppressed"
            time.sleep(0.2)
        assert found.json()["reason"].startswith("hard-bounce: 550 5.1.1")
        assert client.delete(f"/v1/suppressions/{address}").status_code == 204
    assert send(stack, address) == "queued"
