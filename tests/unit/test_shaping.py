"""Rate windows, backoff and controls, driven by a fake clock."""

import bisect
import itertools
from datetime import UTC, datetime, timedelta

import pytest

from schemas.api import Content
from schemas.records import BatchRecipient, ControlAction, ControlCommand, DeliveryBatch, SmtpReply
from schemas.rules import Backoff, Pool, Rules, Shaping, ShapingOverride
from services.runtime.controls import Controls, parse_scope
from services.sender.deliver import Deliverer, DeliveryPolicy
from services.sender.shaping import BURST_S, Destination, RateLimiter, ReplyPatterns, Signal
from services.sender.smtp import SmtpOptions, SmtpPool


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_per_second_rate_is_paced_after_a_one_second_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter([(10, 1.0)], clock)
    slots = limiter.reserve(30)
    assert slots[:10] == pytest.approx([1000.0] * 10)
    # Then one every 100 ms: 30 messages take 2 s, so 60 s carry 600 + the 10-message burst.
    assert slots[29] == pytest.approx(1002.0)
    assert all(b - a == pytest.approx(0.1) for a, b in itertools.pairwise(slots[9:]))


def _most_in_any_window(slots: list[float], window_s: float) -> int:
    """The most slots any half-open window of `window_s` seconds holds."""
    ordered = sorted(slots)
    return max(bisect.bisect_left(ordered, t + window_s) - i for i, t in enumerate(ordered))


def test_the_tightest_window_wins() -> None:
    clock = FakeClock()
    limiter = RateLimiter([(100, 1.0), (120, 60.0)], clock)
    slots = limiter.reserve(200)
    # The per-minute window paces at 2/s with a one-second burst (3 at once): never 100.
    assert slots[:3] == pytest.approx([1000.0] * 3)
    assert all(b - a == pytest.approx(0.5) for a, b in itertools.pairwise(slots[2:]))
    assert _most_in_any_window(slots, 60.0) <= 120 + 2
    assert limiter.rate_per_s == pytest.approx(2.0)


@pytest.mark.parametrize(("count", "seconds"), [(600, 60.0), (3600, 3600.0), (50, 1.0)])
def test_no_sliding_window_holds_more_than_its_count_plus_one_second(
    count: int, seconds: float
) -> None:
    limiter = RateLimiter([(count, seconds)], FakeClock())
    slots = limiter.reserve(2000)
    burst = int(min(count, count / seconds * BURST_S)) + 1
    assert _most_in_any_window(slots, seconds) <= count + burst
    assert _most_in_any_window(slots, 60.0) <= count / seconds * 60 + burst + 1


def test_a_rate_change_goes_on_from_the_last_slot_without_a_new_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter([(10, 1.0)], clock)
    before = limiter.reserve(30)
    limiter.set_windows([(5, 1.0)])  # a throttling reply halves the rate
    after = limiter.reserve(5)
    assert after[0] == pytest.approx(before[-1] + 0.2)
    assert all(b - a == pytest.approx(0.2) for a, b in itertools.pairwise(after))
    clock.now = before[-1] + 3600  # idle for an hour: a fresh (one-second) burst again
    assert limiter.reserve(5) == pytest.approx([clock.now] * 5)


def test_unlimited_limiter_books_now() -> None:
    limiter = RateLimiter([], FakeClock())
    assert not limiter.limited and limiter.reserve(3) == [1000.0] * 3


def reply(code: int, text: str, enhanced: str | None = None) -> SmtpReply:
    return SmtpReply(code=code, enhanced=enhanced, text=text)


@pytest.mark.parametrize(
    ("smtp", "signal"),
    [
        (reply(250, "ok"), Signal.NONE),
        (reply(550, "no such user", "5.1.1"), Signal.NONE),
        (reply(421, "too many connections from your IP", "4.7.0"), Signal.THROTTLE),
        (reply(451, "Rate limited, try again later"), Signal.THROTTLE),
        (
            reply(550, "Blocked - see https://www.spamhaus.org/query/ip/192.0.2.1", "5.7.1"),
            Signal.BLOCK,
        ),
        (reply(554, "Service unavailable; client host blacklisted"), Signal.BLOCK),
        (reply(421, "poor reputation, blocked"), Signal.BLOCK),
    ],
)
def test_reply_patterns(smtp: SmtpReply, signal: Signal) -> None:
    assert ReplyPatterns(Backoff()).signal(smtp) is signal


async def test_throttling_cuts_rate_and_concurrency_and_successes_restore_them() -> None:
    clock = FakeClock()
    backoff = Backoff(recover_after=3, cut_factor=0.5, recover_factor=2.0)
    destination = Destination(
        "x.example", Shaping(messages_per_s=10, max_connections=8), backoff, clock
    )
    await destination.on_signal(Signal.THROTTLE)
    assert destination.effective_rate_per_s() == pytest.approx(5)
    assert destination.concurrency.limit == 4
    await destination.on_signal(Signal.THROTTLE)
    assert destination.effective_rate_per_s() == pytest.approx(2.5)
    for _ in range(3):
        await destination.on_signal(Signal.NONE)
    assert destination.effective_rate_per_s() == pytest.approx(5)
    for _ in range(3):
        await destination.on_signal(Signal.NONE)
    assert (
        destination.effective_rate_per_s() == pytest.approx(10)
        and destination.concurrency.limit == 8
    )


async def test_throttling_an_unlimited_destination_limits_it_below_its_observed_rate() -> None:
    clock = FakeClock()
    destination = Destination("x.example", Shaping(), Backoff(min_rate_per_s=0.5), clock)
    for _ in range(200):
        clock.now += 0.1
        destination.note_send()
    assert destination.effective_rate_per_s() is None
    await destination.on_signal(Signal.THROTTLE)
    assert destination.effective_rate_per_s() == pytest.approx(5, rel=0.1)


def test_backoff_never_goes_below_the_floor() -> None:
    destination = Destination(
        "x.example", Shaping(messages_per_s=1), Backoff(min_rate_per_s=0.5), FakeClock()
    )
    destination.state.factor = 0.01
    destination.set_override(None)
    destination._apply()
    assert destination.effective_rate_per_s() == pytest.approx(0.5)


def batch(domain: str = "gmail.com", key: str = "google", pool: str = "marketing") -> DeliveryBatch:
    return DeliveryBatch(
        message_id="m1",
        tenant="acme",
        pool=pool,
        throttle_key=key,
        domain=domain,
        from_="a@acme.example",
        content=Content(subject="s", text="t"),
        recipients=[BatchRecipient(email=f"x@{domain}", index=0)],
        accepted_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def command(
    scope: str, action: ControlAction = ControlAction.PAUSE, **extra: object
) -> ControlCommand:
    return ControlCommand.model_validate({"scope": scope, "action": action, **extra})


@pytest.mark.parametrize(
    ("scope", "applies"),
    [
        ("domain:gmail.com@pool:marketing", True),
        ("domain:google", True),
        ("provider:google", True),
        ("pool:marketing", True),
        ("tenant:acme", True),
        ("pool:marketing@dnsbl:zen.example", True),
        ("domain:yahoo.com", False),
        ("pool:default", False),
        ("domain:gmail.com@pool:default", False),
        ("tenant:globex", False),
    ],
)
def test_pause_scopes(scope: str, applies: bool) -> None:
    controls = Controls()
    controls.apply(scope, command(scope))
    assert (controls.paused_until(batch()) is not None) is applies


def test_expired_and_removed_controls_do_not_apply() -> None:
    controls = Controls()
    now = datetime(2026, 6, 1, tzinfo=UTC)
    controls.apply(
        "pool:marketing", command("pool:marketing", expires_at=now - timedelta(seconds=1))
    )
    assert controls.paused_until(batch(), now) is None
    controls.apply("domain:google", command("domain:google", expires_at=now + timedelta(hours=1)))
    assert controls.paused_until(batch(), now) == now + timedelta(hours=1)
    controls.apply("domain:google", None)
    assert controls.paused_until(batch(), now) is None


def test_quota_override_takes_the_lowest() -> None:
    controls = Controls()
    controls.apply("domain:google", command("domain:google", ControlAction.QUOTA, messages_per_s=5))
    controls.apply(
        "pool:marketing", command("pool:marketing", ControlAction.QUOTA, messages_per_s=2)
    )
    assert controls.quota(batch()) == 2
    assert parse_scope("Domain:GMAIL.com@pool:x") == {"domain": "gmail.com", "pool": "x"}


def _quota_deliverer(clock: FakeClock, per_s: float) -> Deliverer:
    rules = Rules(domains={"q.example": ShapingOverride(messages_per_s=per_s)})
    policy = DeliveryPolicy(
        bounce_domain="bounces.example",
        verp_key=b"k" * 16,
        retry_schedule_s=[60.0],
        max_age=timedelta(days=1),
        max_quota_wait_s=2.0,
    )
    smtp = SmtpPool(SmtpOptions(ehlo="sender.example"))
    return Deliverer(Pool(name="default"), rules, policy, smtp, None, Controls(), clock=clock)


def _quota_batch(n: int, held: bool) -> DeliveryBatch:
    return DeliveryBatch(
        message_id=f"m{n}",
        tenant="acme",
        pool="default",
        throttle_key="q.example",
        domain="q.example",
        from_="a@acme.example",
        content=Content(subject="s", text="t"),
        recipients=[BatchRecipient(email=f"r{i}@q.example", index=i) for i in range(10)],
        accepted_at=datetime.now(UTC),
        held_for="quota" if held else None,
    )


@pytest.mark.parametrize("new_owner", [False, True])
def test_held_batches_coming_back_bunched_never_beat_the_rate(new_owner: bool) -> None:
    """Twenty batches of ten at 5/s: most are held; they come back all at once (late, or to
    a new owner after a rebalance) and still no second carries more than the rate allows."""
    clock = FakeClock()
    deliverer = _quota_deliverer(clock, 5.0)
    destination = deliverer.destinations.get("q.example")
    sent: list[float] = []
    held = 0
    for n in range(20):
        slots = deliverer._book_slots(_quota_batch(n, False), destination)
        if isinstance(slots, list):
            sent += slots
        else:
            held += 1
    assert held >= 18
    if new_owner:
        deliverer = _quota_deliverer(clock, 5.0)
        destination = deliverer.destinations.get("q.example")
    clock.now += 30.0  # they all come back at the same moment
    for _ in range(100):
        back = held
        held = 0
        for n in range(back):
            slots = deliverer._book_slots(_quota_batch(n, True), destination)
            if isinstance(slots, list):
                sent += slots
            else:
                held += 1
        if not held:
            break
        clock.now = max(clock.now, min(destination.held_horizon, clock.now + 5.0))
    assert not held and len(sent) == 200
    burst = int(5.0 * BURST_S) + 1
    assert _most_in_any_window(sent, 1.0) <= 5 + burst
