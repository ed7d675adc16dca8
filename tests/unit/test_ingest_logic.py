from pathlib import Path

import pytest

from schemas.api import MessageRequest
from schemas.records import DeliveryEvent, EventType
from schemas.rules import Rules, RulesError, load_rules
from services.bounce.suppress import suppression_for
from services.ingest.accept import UnknownPool, accept, answer
from services.ingest.auth import ApiKeys, hash_key
from services.ingest.errors import field_name


def request(**extra: object) -> MessageRequest:
    return MessageRequest.model_validate(
        {
            "from": "a@acme.example",
            "to": ["x@y.example", "z@y.example"],
            "subject": "s",
            "text": "t",
            **extra,
        }
    )


def test_accept_marks_suppressed_recipients_and_picks_the_default_pool() -> None:
    accepted = accept(request(), "acme", Rules(), lambda t, a: a == "z@y.example")
    assert accepted.pool == "default" and accepted.tenant == "acme" and len(accepted.id) == 32
    assert [(r.email, r.status) for r in answer(accepted).recipients] == [
        ("x@y.example", "queued"),
        ("z@y.example", "suppressed"),
    ]
    with pytest.raises(UnknownPool):
        accept(request(pool="nope"), "acme", Rules(), lambda t, a: False)


def test_api_keys_from_pairs_and_hashed_file(tmp_path: Path) -> None:
    keys = ApiKeys.from_pairs("acme:k1, globex:k2")
    assert keys.tenant_for("k1") == "acme" and keys.tenant_for("k2") == "globex"
    assert keys.tenant_for("k3") is None
    hashed = tmp_path / "keys"
    hashed.write_text(f"# tenant:sha256\ninitech:{hash_key('secret')}\n")
    assert ApiKeys.from_file(hashed).tenant_for("secret") == "initech"
    with pytest.raises(ValueError, match="tenant"):
        ApiKeys.from_pairs("Bad Tenant:k")
    with pytest.raises(ValueError, match="tenant:key"):
        ApiKeys.from_pairs("nokey")


def test_field_names_are_readable() -> None:
    assert field_name(("body", "to", 0, "Recipient", "email")) == "to[0].email"
    assert field_name(("body",)) is None


def test_rules_file_errors_name_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("pools:\n  - name: Bad Name\n")
    with pytest.raises(RulesError, match=r"pools\.0\.name"):
        load_rules(path)
    path.write_text("default_pool: other\n")
    with pytest.raises(RulesError, match="default_pool"):
        load_rules(path)


@pytest.mark.parametrize(
    ("kind", "category", "hard", "suppresses"),
    [
        ("bounced", "bad-mailbox", True, True),
        ("bounced", "bad-domain", True, True),
        ("bounced", "policy", True, False),
        ("bounced", "spam-blocked", True, False),
        ("deferred", "quota", False, False),
        ("complained", None, None, True),
        ("unsubscribed", None, None, True),
        ("delivered", None, None, False),
    ],
)
def test_which_events_suppress(
    kind: str, category: str | None, hard: bool | None, suppresses: bool
) -> None:
    event = DeliveryEvent(
        type=EventType(kind),
        message_id="m",
        tenant="acme",
        recipient="x@y.example",
        category=category,
        hard=hard,
    )
    assert (suppression_for(event) is not None) is suppresses
