"""Operator commands, the destination table, the event digest and the status page (no broker)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from schemas.records import ControlAction, DestinationStats, LastReply
from services.ingest.admin import ControlRequest, check_key, command_of
from services.ingest.errors import ApiError
from services.ops import page, table
from services.ops.commands import (
    PURGE_LIFETIME,
    CommandError,
    Target,
    build,
    key_for,
    parse_duration,
    parse_rate,
)
from services.ops.digest import EventDigest
from services.runtime.lag import lag_of

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def test_a_target_has_one_canonical_scope_so_resume_finds_the_pause() -> None:
    target = Target("Gmail.com", "marketing", "acme")
    assert target.scope == "domain:gmail.com@pool:marketing@tenant:acme"
    assert Target.from_scope(target.scope).scope == target.scope
    assert key_for(ControlAction.PAUSE, Target(pool="m")) == "pool:m"
    assert key_for(ControlAction.QUOTA, Target("gmail")) == "domain:gmail@control:quota"


@pytest.mark.parametrize(
    ("text", "per_s"), [("5", 5.0), ("5/s", 5.0), ("300/m", 5.0), ("7200/h", 2.0), ("1.5", 1.5)]
)
def test_rates(text: str, per_s: float) -> None:
    assert parse_rate(text) == per_s


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("action", "target", "fields", "message"),
    [
        (ControlAction.QUOTA, Target("x.example"), {}, "rate"),
        (ControlAction.MOVE, Target("x.example"), {}, "pool to move to"),
        (ControlAction.MOVE, Target(pool="a"), {"to_pool": "b"}, "destination"),
        (ControlAction.MOVE, Target("x", "a"), {"to_pool": "a"}, "already in"),
        (ControlAction.PURGE, Target(pool="a"), {}, "destination or a tenant"),
    ],
)
def test_commands_that_cannot_be(
    action: ControlAction, target: Target, fields: dict[str, str], message: str
) -> None:
    with pytest.raises(CommandError, match=message):
        build(action, target, **fields)  # type: ignore[arg-type]


def test_bad_targets_and_values_are_refused() -> None:
    for fields in ({}, {"domain": "not a domain"}, {"pool": "Big"}):
        with pytest.raises(CommandError):
            Target(**fields)
    for text in ("fast", "0", "-1/s"):
        with pytest.raises(CommandError):
            parse_rate(text)


def test_a_purge_lasts_long_enough_and_a_quota_for_its_time() -> None:
    purge = build(ControlAction.PURGE, Target(tenant="acme"), now=NOW)
    assert purge.expires_at == NOW + PURGE_LIFETIME and purge.scope == "tenant:acme@control:purge"
    quota = build(
        ControlAction.QUOTA, Target("gmail"), rate_per_s=2, lasting=timedelta(hours=1), now=NOW
    )
    assert quota.messages_per_s == 2 and quota.expires_at == NOW + timedelta(hours=1)


def test_the_admin_api_builds_the_same_commands_and_checks_pools() -> None:
    request = ControlRequest.model_validate(
        {"action": "quota", "destination": "gmail", "pool": "default", "rate": "300/m", "for": "2h"}
    )
    command = command_of(request, ["default"])
    assert command.scope == "domain:gmail@pool:default@control:quota"
    assert command.messages_per_s == 5.0
    with pytest.raises(CommandError, match="unknown pool"):
        command_of(ControlRequest(action=ControlAction.PAUSE, pool="nope"), ["default"])


def test_admin_keys_bearer_or_basic() -> None:
    keys = [b"k1", b"k2"]
    check_key(keys, "Bearer k2")
    check_key(keys, "Basic b3BzOmsx")  # ops:k1
    for wrong in (None, "Bearer nope", "Basic !!", "Basic b3BzOg=="):
        with pytest.raises(ApiError) as raised:
            check_key(keys, wrong)
        assert raised.value.status == 401
    with pytest.raises(ApiError) as off:
        check_key([], "Bearer k1")
    assert off.value.status == 403


def stats(**fields: object) -> DestinationStats:
    base: dict[str, object] = {
        "pool": "default",
        "destination": "gmail",
        "sender": "s/1",
        "ts": NOW,
        "interval_s": 5.0,
    }
    return DestinationStats.model_validate(base | fields)


def test_table_rows_say_what_state_a_destination_is_in() -> None:
    paused = stats(destination="a", paused_until=NOW + timedelta(hours=1), held=4, in_progress=1)
    backing = stats(destination="b", backoff_factor=0.5, rate_per_s=2.0)
    stale = stats(destination="c", ts=NOW - timedelta(minutes=5))
    gone = stats(destination="d", ts=NOW - timedelta(hours=2))
    rows = table.rows([backing, stale, paused, gone], now=NOW)
    assert [(r.destination, r.state, r.queue) for r in rows] == [
        ("a", "paused", 5),
        ("b", "backoff x0.50", 0),
        ("c", "stale", 0),
    ]
    assert len(table.rows([gone], now=NOW, show_all=True)) == 1


def test_the_text_table_has_a_header_and_the_last_reply() -> None:
    reply = LastReply(ts=NOW, code=421, enhanced="4.7.0", text="slow down", mx="mx.gmail")
    row = table.rows([stats(quota_per_s=40.0, override_per_s=40.0, last_replies=[reply])], NOW)
    text = table.render(row)
    header, line = text.splitlines()
    assert header.split()[:3] == ["POOL", "DESTINATION", "STATE"]
    assert "40 (override)" in line and line.endswith("421 4.7.0 slow down (mx.gmail)")
    assert "no destination" in table.render([])


def event(kind: str, **fields: object) -> bytes:
    return orjson.dumps({"v": 1, "type": kind, "recipient": "u@x.example", "pool": "p"} | fields)


def test_the_digest_counts_per_minute_and_bounces_by_category() -> None:
    digest = EventDigest(window_minutes=60)
    now_s = 1_800_000_000.0
    for minutes_ago, kind in (
        (0, "delivered"),
        (0, "delivered"),
        (5, "deferred"),
        (90, "delivered"),
    ):
        digest.add(event(kind), int((now_s - minutes_ago * 60) * 1000))
    smtp = {"code": 550, "enhanced": "5.1.1", "text": "no such user"}
    digest.add(event("bounced", category="bad-mailbox", smtp=smtp), int(now_s * 1000))
    digest.add(event("queued"), int(now_s * 1000))
    digest.add(b"not json", int(now_s * 1000))
    result = digest.digest(now_s)
    assert len(result.minutes) == 60 and result.minutes[-1][1] == {"delivered": 2, "bounced": 1}
    assert result.totals == {"delivered": 2, "deferred": 1, "bounced": 1}
    assert result.bounces_by_category == {"bad-mailbox": 1}
    (recent,) = result.recent_bounces
    assert (recent.domain, recent.reply) == ("x.example", "550 5.1.1 no such user")


def test_the_page_is_self_contained_and_escapes_what_it_shows() -> None:
    digest = EventDigest()
    digest.add(event("delivered"), int(time.time() * 1000))
    reply = LastReply(ts=NOW, code=550, text="<script>alert(1)</script>")
    html = page.render(
        table.rows([stats(last_replies=[reply])], NOW),
        digest.digest(time.time()),
        {"pool:x": build(ControlAction.PAUSE, Target(pool="x"), reason="r&d", now=NOW)},
        NOW,
    )
    assert "<script>" not in html and "&lt;script&gt;" in html and "r&amp;d" in html
    assert 'id="destinations"' in html and '<svg id="throughput"' in html
    assert "http" not in html.replace('http-equiv="refresh"', "")  # nothing loaded from elsewhere
    assert "loading" in page.render([], None, {}, NOW)


def test_lag_is_unknown_until_both_offsets_are() -> None:
    assert lag_of(100, 40) == 60
    assert lag_of(100, -1001) is None and lag_of(-1001, 5) is None
    assert lag_of(10, 12) == 0
