"""Operator controls on the running stack: the `mailrail` command line and the admin API
write `mail.control`; the senders obey each control within 2 s."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from typing import Any

import httpx

from deploy.local.stack import REPO
from schemas.records import EventType
from tests.integration.conftest import (
    ADMIN_KEY,
    OTHER_KEY,
    RULES,
    TOPIC_PREFIX,
    Stack,
    unique,
)
from tests.support.kafka import BOOTSTRAP, EventLog

#: The senders obey a control within this long (the contract); the tests wait it out.
OBEY_S = 2.0
#: Held mail is released by a resume, move or purge within this long, although the stack's
#: senders look at held mail again only every 60 s (MAILRAIL_PAUSE_RECHECK_S).
RELEASE_S = 10.0


def mailrail(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILRAIL_")}
    env |= {
        "MAILRAIL_KAFKA_BOOTSTRAP": BOOTSTRAP,
        "MAILRAIL_TOPIC_PREFIX": TOPIC_PREFIX,
        "MAILRAIL_RULES": str(RULES),
    }
    return subprocess.run(
        [str(REPO / "bin" / "mailrail"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(*args: str) -> str:
    result = mailrail(*args)
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout


def post(
    stack: Stack, recipients: list[str], key: str | None = None, pool: str | None = None
) -> str:
    body: dict[str, Any] = {"from": "a@acme.example", "to": recipients, "subject": "s", "text": "t"}
    if pool:
        body["pool"] = pool
    with stack.client(*([key] if key else [])) as client:
        answer = client.post("/v1/messages", json=body)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def admin(stack: Stack) -> httpx.Client:
    return httpx.Client(
        base_url=stack.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
    )


def attempted(events: EventLog, recipient: str) -> list[str]:
    kinds = {"delivered", "deferred", "bounced", "expired"}
    return [e.type.value for e in events.events(recipient) if e.type.value in kinds]


def queue_row(pool: str, destination: str) -> dict[str, Any] | None:
    rows = json.loads(ok("queues", "--json", "--pool", pool))
    return next((r for r in rows if r["destination"] == destination), None)


def wait_row(pool: str, destination: str, check: Any, timeout_s: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        row = queue_row(pool, destination)
        if row is not None and check(row):
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"{pool}/{destination}: {row}")
        time.sleep(0.5)


def test_pause_and_resume_a_destination(stack: Stack, events: EventLog) -> None:
    domain = f"op-pause-{uuid.uuid4().hex[:8]}.example"
    out = ok("pause", domain, "--pool", "default", "--reason", "mailbox provider asked us")
    assert out.startswith(f"pause domain:{domain}@pool:default")
    try:
        time.sleep(OBEY_S)
        held = unique("p", domain)
        post(stack, [held])
        row = wait_row("default", domain, lambda r: r["state"] == "paused")
        assert row["pause_reason"] == "mailbox provider asked us" and row["queue"] >= 1
        assert not stack.sink.messages_for(held) and not attempted(events, held)
        listed = ok("controls")
        assert f"domain:{domain}@pool:default" in listed and "mailbox provider" in listed
        assert ok("resume", domain, "--pool", "default").startswith("removed pause")
        events.wait_types(held, {"delivered"}, timeout_s=RELEASE_S)
        wait_row("default", domain, lambda r: r["state"] != "paused" and r["delivered"] == 1)
    finally:
        mailrail("resume", domain, "--pool", "default")


def test_pause_a_pool_and_a_tenant(stack: Stack, events: EventLog) -> None:
    ok("pause", "--pool", "mxtest", "--for", "2m")
    ok("pause", "--tenant", "globex", "--for", "2m")
    try:
        time.sleep(OBEY_S)
        in_pool = unique("pool", "mx-routed.example")
        of_tenant = unique("tenant", "op-tenant.example")
        of_other = unique("other", "op-tenant.example")
        post(stack, [in_pool], pool="mxtest")
        post(stack, [of_tenant], key=OTHER_KEY)
        post(stack, [of_other])
        events.wait_types(of_other, {"delivered"})  # acme's mail to the same domain goes
        time.sleep(2)
        assert not attempted(events, in_pool) and not attempted(events, of_tenant)
        assert not stack.mx.messages_for(in_pool) and not stack.sink.messages_for(of_tenant)
        ok("resume", "--pool", "mxtest")
        ok("resume", "--tenant", "globex")
        events.wait_types(in_pool, {"delivered"}, timeout_s=RELEASE_S)
        events.wait_types(of_tenant, {"delivered"}, timeout_s=RELEASE_S)
    finally:
        mailrail("resume", "--pool", "mxtest")
        mailrail("resume", "--tenant", "globex")


def test_quota_override_for_a_time_through_the_admin_api(stack: Stack, events: EventLog) -> None:
    domain = f"op-quota-{uuid.uuid4().hex[:8]}.example"
    with admin(stack) as client:
        answer = client.post(
            "/admin/v1/controls",
            json={"action": "quota", "destination": domain, "rate": "120/m", "for": "1h"},
        )
        assert answer.status_code == 201, answer.text
        key = answer.json()["key"]
        assert key == f"domain:{domain}@control:quota"
        command = answer.json()["command"]
        assert command["messages_per_s"] == 2.0 and command["expires_at"]
        try:
            time.sleep(OBEY_S)
            recipients = [unique(f"q{i}", domain) for i in range(8)]
            post(stack, recipients)
            for recipient in recipients:
                events.wait_types(recipient, {"delivered"}, timeout_s=30)
            times = sorted(
                m.received_at.timestamp() for r in recipients for m in stack.sink.messages_for(r)
            )
            assert times[-1] - times[0] >= (8 - 2) / 2 * 0.9
            row = wait_row("default", domain, lambda r: r["override_per_s"] == 2.0)
            assert row["quota_per_s"] == 2.0
            assert key in client.get("/admin/v1/controls").json()
        finally:
            removed = client.delete(f"/admin/v1/controls/{key}")
        assert removed.status_code == 200 and removed.json() == {"key": key, "was_in_force": True}
        assert key not in client.get("/admin/v1/controls").json()


def test_the_admin_api_needs_an_admin_key(stack: Stack) -> None:
    body = {"action": "pause", "destination": "x.example"}
    tenant_key = stack.client().post("/admin/v1/controls", json=body)
    anonymous = httpx.get(f"{stack.url}/admin/v1/queues")
    with admin(stack) as client:
        bad = client.post("/admin/v1/controls", json={"action": "quota", "destination": "x"})
        unknown_pool = client.post("/admin/v1/controls", json={"action": "pause", "pool": "nope"})
    assert tenant_key.status_code == 401 and tenant_key.json()["error"]["code"] == "unauthorized"
    assert anonymous.status_code == 401 and "Basic" in anonymous.headers["WWW-Authenticate"]
    assert bad.status_code == 400 and "rate" in bad.json()["error"]["message"]
    assert (
        unknown_pool.status_code == 400
        and "unknown pool" in unknown_pool.json()["error"]["message"]
    )


def test_move_a_destination_to_another_pool(stack: Stack, events: EventLog) -> None:
    out = ok("move", "mx-routed.example", "--from", "default", "--to", "mxtest", "--for", "10m")
    assert "to pool mxtest" in out
    try:
        time.sleep(OBEY_S)
        moved = unique("moved", "mx-routed.example")
        post(stack, [moved])  # the default pool
        delivered = [
            e
            for e in events.wait_types(moved, {"delivered"}, timeout_s=20)
            if e.type is EventType.DELIVERED
        ]
        assert delivered[0].pool == "mxtest"
        assert stack.mx.messages_for(moved) and not stack.sink.messages_for(moved)
    finally:
        ok("move", "mx-routed.example", "--from", "default", "--cancel")


def test_move_releases_mail_already_held_to_the_other_pool(stack: Stack, events: EventLog) -> None:
    ok("pause", "mx-routed.example", "--pool", "default", "--for", "10m")
    try:
        time.sleep(OBEY_S)
        held = unique("held-moved", "mx-routed.example")
        post(stack, [held])  # the default pool, paused: held
        wait_row("default", "mx-routed.example", lambda r: r["state"] == "paused")
        assert not attempted(events, held)
        ok("move", "mx-routed.example", "--from", "default", "--to", "mxtest", "--for", "10m")
        delivered = [
            e
            for e in events.wait_types(held, {"delivered"}, timeout_s=RELEASE_S)
            if e.type is EventType.DELIVERED
        ]
        assert delivered[0].pool == "mxtest" and stack.mx.messages_for(held)
    finally:
        mailrail("move", "mx-routed.example", "--from", "default", "--cancel")
        mailrail("resume", "mx-routed.example", "--pool", "default")


def test_purge_the_queued_mail_of_a_destination_and_of_a_tenant(
    stack: Stack, events: EventLog
) -> None:
    domain = f"op-purge-{uuid.uuid4().hex[:8]}.example"
    ok("pause", domain, "--pool", "default")
    ok("pause", "--tenant", "globex", "--for", "2m")
    try:
        time.sleep(OBEY_S)
        queued = [unique(f"q{i}", domain) for i in range(3)]
        post(stack, queued)
        of_tenant = unique("globex", "op-purge-tenant.example")
        post(stack, [of_tenant], key=OTHER_KEY)
        wait_row("default", domain, lambda r: r["state"] == "paused")
        refused = mailrail("purge", domain)
        assert refused.returncode == 2 and "--yes" in refused.stdout
        ok("purge", domain, "--yes", "--reason", "sent by mistake")
        ok("purge", "--tenant", "globex", "--yes")
        for recipient in [*queued, of_tenant]:
            bounced = [
                e
                for e in events.wait_types(recipient, {"bounced"}, timeout_s=RELEASE_S)
                if e.type is EventType.BOUNCED
            ]
            assert bounced[0].category == "purged" and bounced[0].hard
            assert "purged by an operator" in (bounced[0].detail or "")
        assert "sent by mistake" in (
            next(e for e in events.events(queued[0]) if e.type is EventType.BOUNCED).detail or ""
        )
        # Mail accepted after the purge is not purged; a purged address is not suppressed.
        ok("resume", domain, "--pool", "default")
        later = unique("later", domain)
        post(stack, [later])
        events.wait_types(later, {"delivered"}, timeout_s=20)
        with stack.client() as client:
            assert client.get(f"/v1/suppressions/{queued[0]}").status_code == 404
        assert not any(stack.sink.messages_for(r) for r in queued)
    finally:
        mailrail("resume", domain, "--pool", "default")
        mailrail("resume", "--tenant", "globex")
        mailrail("remove", f"domain:{domain}@control:purge")
        mailrail("remove", "tenant:globex@control:purge")


def test_queues_show_rate_quota_backoff_and_last_replies(stack: Stack, events: EventLog) -> None:
    recipients = [unique(f"r{i}", "rated.example") for i in range(3)]
    bad = unique("bounce", "rated.example")
    post(stack, [*recipients, bad])
    for recipient in recipients:
        events.wait_types(recipient, {"delivered"})
    row = wait_row(
        "default",
        "rated.example",
        lambda r: r["delivered"] >= 3 and r["bounced"] >= 1 and r["age_s"] < 5,
    )
    assert row["quota_per_s"] == 4.0 and row["backoff_factor"] == 1.0
    assert row["connections"].endswith("/4")
    assert row["last_reply"]
    text = ok("queues", "--pool", "default")
    header, *lines = text.splitlines()
    assert header.split()[:5] == ["POOL", "DESTINATION", "STATE", "QUEUE", "BACKLOG"]
    line = next(ln for ln in lines if " rated.example " in ln)
    assert line.split()[0] == "default"
    with admin(stack) as client:
        rows = client.get("/admin/v1/queues", params={"pool": "default"}).json()
    assert any(r["destination"] == "rated.example" for r in rows)
