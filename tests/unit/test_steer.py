"""What the sender does with a batch under an operator's MOVE or PURGE (no broker)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson

from schemas.api import Content
from schemas.catalogue import EVENTS, outbound_topic
from schemas.records import (
    BatchRecipient,
    ControlAction,
    ControlCommand,
    DeliveryBatch,
    DeliveryEvent,
    EventType,
)
from services.bounce.suppress import suppression_for
from services.ops.commands import Target, build
from services.runtime.controls import Controls
from services.sender.steer import steer

ACCEPTED = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
NOW = ACCEPTED + timedelta(minutes=5)
POOLS = ["default", "marketing"]


def batch(pool: str = "marketing", tenant: str = "acme", held: bool = False) -> DeliveryBatch:
    return DeliveryBatch(
        message_id="m1",
        tenant=tenant,
        pool=pool,
        throttle_key="gmail",
        domain="gmail.com",
        from_="a@acme.example",
        content=Content(subject="s", text="t"),
        recipients=[BatchRecipient(email=f"u{i}@gmail.com", index=i) for i in range(3)],
        accepted_at=ACCEPTED,
        held_for="quota" if held else None,
        not_before=NOW if held else None,
    )


def controls(*commands: ControlCommand) -> Controls:
    result = Controls()
    for command in commands:
        result.apply(command.scope, command)
    return result


def move(
    to: str = "default", pool: str | None = "marketing", minutes: float = 60
) -> ControlCommand:
    return build(
        ControlAction.MOVE,
        Target("gmail", pool),
        to_pool=to,
        lasting=timedelta(minutes=minutes),
        now=NOW - timedelta(minutes=1),
    )


def test_nothing_in_force_delivers_as_usual() -> None:
    pause = build(ControlAction.PAUSE, Target("gmail"), now=NOW)
    assert steer(controls(pause), batch(), POOLS, NOW) is None


def test_move_republishes_the_batch_to_the_other_pools_outbound_topic() -> None:
    (output,) = steer(controls(move()), batch(held=True), POOLS, NOW) or []
    assert output.topic == outbound_topic("default") and output.key == "gmail"
    moved = DeliveryBatch.model_validate_json(output.value or b"")
    assert moved.pool == "default" and moved.held_for is None and moved.not_before is None
    assert moved.recipients == batch().recipients and moved.message_id == "m1"


def test_a_moved_batch_is_not_moved_again_nor_to_an_unknown_pool() -> None:
    everywhere = move(pool=None)
    assert steer(controls(everywhere), batch(pool="default"), POOLS, NOW) is None
    assert steer(controls(move(to="nowhere")), batch(), POOLS, NOW) is None


def test_an_expired_move_no_longer_applies() -> None:
    assert steer(controls(move(minutes=0.5)), batch(), POOLS, NOW) is None


def test_purge_bounces_every_recipient_of_mail_accepted_before_it() -> None:
    purge = build(ControlAction.PURGE, Target("gmail"), reason="sent by mistake", now=NOW)
    outputs = steer(controls(purge), batch(), POOLS, NOW) or []
    assert [o.topic for o in outputs] == [EVENTS] * 3
    events = [DeliveryEvent.model_validate(orjson.loads(o.value or b"")) for o in outputs]
    assert {e.recipient for e in events} == {"u0@gmail.com", "u1@gmail.com", "u2@gmail.com"}
    for event in events:
        assert event.type is EventType.BOUNCED and event.category == "purged" and event.hard
        assert event.detail == "purged by an operator (domain:gmail@control:purge): sent by mistake"
        assert suppression_for(event) is None, "a purge says nothing about the address"


def test_purge_spares_mail_accepted_after_it_and_other_tenants() -> None:
    purge = build(ControlAction.PURGE, Target(tenant="globex"), now=NOW)
    later = batch(tenant="globex").model_copy(update={"accepted_at": NOW + timedelta(seconds=1)})
    assert steer(controls(purge), later, POOLS, NOW) is None
    assert steer(controls(purge), batch(tenant="acme"), POOLS, NOW) is None
    assert steer(controls(purge), batch(tenant="globex"), POOLS, NOW)


def test_a_purge_wins_over_a_move() -> None:
    purge = build(ControlAction.PURGE, Target("gmail"), now=NOW)
    outputs = steer(controls(move(), purge), batch(), POOLS, NOW) or []
    assert outputs and all(o.topic == EVENTS for o in outputs)


def test_a_pause_and_a_quota_on_one_destination_do_not_replace_each_other() -> None:
    target = Target("gmail", "marketing")
    pause = build(ControlAction.PAUSE, target, now=NOW)
    quota = build(ControlAction.QUOTA, target, rate_per_s=5, now=NOW)
    both = controls(pause, quota)
    assert both.paused_until(batch(), NOW) is not None
    assert both.quota(batch(), NOW) == 5
