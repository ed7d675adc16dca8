"""The status page (`/ui`) as an operator sees it: loaded in a real headless Chromium."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ADMIN_KEY, Stack, unique
from tests.support.browser import CHROMIUM, dump_dom, element_ids, screenshot, tables
from tests.support.kafka import EventLog

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)",
)


def page_url(stack: Stack) -> str:
    # HTTP Basic with the admin key as the password: what a person types in the prompt.
    return stack.url.replace("http://", f"http://ops:{ADMIN_KEY}@") + "/ui"


def test_the_status_page_shows_destinations_throughput_and_bounces(
    stack: Stack, events: EventLog, tmp_path: Path
) -> None:
    domain = f"ui-{uuid.uuid4().hex[:8]}.example"
    good = [unique(f"u{i}", domain) for i in range(3)]
    bad = unique("bounce", domain)
    with stack.client() as client:
        answer = client.post(
            "/v1/messages",
            json={"from": "a@acme.example", "to": [*good, bad], "subject": "s", "text": "t"},
        )
    assert answer.status_code == 202
    for recipient in good:
        events.wait_types(recipient, {"delivered"})
    events.wait_types(bad, {"bounced"})

    deadline = time.monotonic() + 30
    while True:
        dom = dump_dom(page_url(stack))
        found = tables(dom)
        rows = {tuple(r[:2]): r for r in found.get("destinations", [])[1:] if len(r) > 2}
        row = rows.get(("default", domain))
        ready = "throughput" in element_ids(dom)
        # The destination table and the bounce digest follow different topics: wait for both.
        recent = found.get("recent-bounces", [])[1:]
        listed = any(len(r) > 3 and r[2] == domain and r[3] == "bad-mailbox" for r in recent)
        if row is not None and row[8] == "3" and ready and listed:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never showed {domain}: {found}")
        time.sleep(1)

    header = found["destinations"][0]
    assert header[:4] == ["POOL", "DESTINATION", "STATE", "QUEUE"]
    named = dict(zip(header, row, strict=True))
    assert named["DELIVERED"] == "3" and named["BOUNCED"] == "1"
    assert named["QUOTA/S"] == "-" and named["CONN"].endswith("/4")
    assert named["LAST REPLY"].startswith(("250", "550"))

    svg = element_ids(dom)["throughput"]
    assert svg["tag"] == "svg"
    assert 'data-series="delivered"' in dom and 'data-series="bounced"' in dom

    categories = dict((r[0], int(r[1])) for r in found["bounces"][1:] if len(r) == 2)
    assert categories.get("bad-mailbox", 0) >= 1

    shot = tmp_path / "ui.png"
    screenshot(page_url(stack), shot)
    assert shot.exists() and shot.stat().st_size > 10_000


def test_the_status_page_asks_for_the_admin_key(stack: Stack) -> None:
    anonymous = httpx.get(f"{stack.url}/ui")
    wrong = httpx.get(f"{stack.url}/ui", auth=("ops", "not-the-key"))
    for answer in (anonymous, wrong):
        assert answer.status_code == 401
        assert answer.headers["WWW-Authenticate"].startswith("Basic")
    assert "Mailrail status" in httpx.get(f"{stack.url}/ui", auth=("ops", ADMIN_KEY)).text
