from datetime import UTC, datetime

from schemas.api import Content
from schemas.records import AcceptedMessage, AcceptedRecipient
from schemas.rules import Provider, Rules, ShapingOverride
from services.router.route import recheck, route


def message(*emails: str, suppressed: tuple[str, ...] = ()) -> AcceptedMessage:
    return AcceptedMessage(
        id="m1",
        tenant="acme",
        accepted_at=datetime(2026, 1, 1, tzinfo=UTC),
        from_="a@acme.example",
        content=Content(subject="s", text="t"),
        recipients=[AcceptedRecipient(email=e, suppressed=e in suppressed) for e in emails],
        pool="default",
    )


def test_recipients_are_grouped_by_domain_and_keyed_by_it() -> None:
    batches, events = route(
        message("a@x.example", "b@y.example", "c@x.example"), Rules(), lambda t, a: False
    )
    by_domain = {b.domain: [r.email for r in b.recipients] for b in batches}
    assert by_domain == {"x.example": ["a@x.example", "c@x.example"], "y.example": ["b@y.example"]}
    assert all(b.throttle_key == b.domain for b in batches)
    assert [r.index for b in batches for r in b.recipients] == [0, 2, 1]
    assert [e.type.value for e in events] == ["queued"] * 3


def test_batches_respect_the_recipient_limit() -> None:
    rules = Rules(domains={"x.example": ShapingOverride(max_recipients_per_batch=2)})
    batches, _ = route(message(*(f"u{i}@x.example" for i in range(5))), rules, lambda t, a: False)
    assert [len(b.recipients) for b in batches] == [2, 2, 1]


def test_suppressed_recipients_get_events_not_batches() -> None:
    batches, events = route(
        message("a@x.example", "b@x.example", "c@x.example", suppressed=("a@x.example",)),
        Rules(),
        lambda tenant, address: address == "b@x.example",
    )
    assert [r.email for b in batches for r in b.recipients] == ["c@x.example"]
    assert {(e.recipient, e.type.value) for e in events} == {
        ("a@x.example", "suppressed"),
        ("b@x.example", "suppressed"),
        ("c@x.example", "queued"),
    }


def test_recheck_drops_recipients_suppressed_since() -> None:
    batches, _ = route(message("a@x.example", "b@x.example"), Rules(), lambda t, a: False)
    live, events = recheck(batches[0], lambda t, a: a == "a@x.example")
    assert live is not None and [r.email for r in live.recipients] == ["b@x.example"]
    assert [(e.recipient, e.type.value) for e in events] == [("a@x.example", "suppressed")]
    gone, _ = recheck(batches[0], lambda t, a: True)
    assert gone is None


def test_provider_groups_share_a_throttle_key_and_its_shaping() -> None:
    rules = Rules(
        providers={
            "google": Provider(
                domains=["gmail.com"], mx_suffixes=["google.com"], max_recipients_per_batch=1
            )
        }
    )
    assert rules.throttle_key("GMAIL.com") == "google"
    assert rules.throttle_key("corp.example", ["aspmx.l.google.com."]) == "google"
    assert rules.throttle_key("corp.example", ["mx.notgoogle.com"]) == "corp.example"
    batches, _ = route(
        message("a@gmail.com", "b@corp.example", "c@corp.example"),
        rules,
        lambda t, a: False,
        {"corp.example": "google"},
    )
    assert sorted((b.domain, b.throttle_key, len(b.recipients)) for b in batches) == [
        ("corp.example", "google", 1),
        ("corp.example", "google", 1),
        ("gmail.com", "google", 1),
    ]
