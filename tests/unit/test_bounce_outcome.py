"""What each real report means once received: the events and records the bounce service writes.

The fixtures (tests/fixtures/reports, see its README) came to the VERP return path in their
`To:` header, signed with the fixtures' key; ARF reports came to the feedback address.
"""

from __future__ import annotations

import email.utils
import json
import re
from datetime import UTC, datetime
from email import message_from_bytes
from pathlib import Path

import pytest

from schemas.catalogue import EVENTS, REJECTED
from schemas.records import DeliveryEvent
from services.bounce.classify import DEFAULT_CLASSIFIER
from services.bounce.match import Keys
from services.bounce.oneclick import encode_token
from services.bounce.receiver import Policy, process
from services.bounce.verp import encode_message_id, encode_return_path

FIXTURES = Path(__file__).parent.parent / "fixtures" / "reports"
FIXTURE_VERP_KEY = b"mailrail-fixture-verp-key-0000000"
UNSUBSCRIBE_KEY = b"unit-test-unsubscribe-key-0001"
BOUNCE_DOMAIN = "bounce.mailrail.test"
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
POLICY = Policy(
    bounce_domain=BOUNCE_DOMAIN,
    keys=Keys(FIXTURE_VERP_KEY, UNSUBSCRIBE_KEY),
    classifier=DEFAULT_CLASSIFIER,
    report_local_parts=frozenset({"bounces", "fbl", "abuse", "postmaster"}),
    unsubscribe_address=f"unsubscribe@{BOUNCE_DOMAIN}",
)
M = "01J9Z6Q3V4T8K2M5N7P9R1S3T"  # the fixtures' message ids: M + one letter

# file → [(type, message id, recipient, category, hard, (code, enhanced))]
Row = tuple[str, str, str, str | None, bool | None, tuple[int, str | None] | None]
EXPECTED: dict[str, list[Row]] = {
    "postfix-550-user-unknown.eml": [
        ("bounced", M + "A", "nosuch@remote.test", "bad-mailbox", True, (550, "5.1.1"))
    ],
    "postfix-two-recipients-quota-and-block.eml": [
        ("bounced", M + "B", "blocked@remote.test", "spam-blocked", True, (554, "5.7.1")),
        ("bounced", M + "B", "full@remote.test", "quota", True, (552, "5.2.2")),
    ],
    "postfix-local-unknown-user.eml": [
        ("bounced", M + "C", "nosuchuser@localhost", "bad-mailbox", True, (550, "5.1.1"))
    ],
    "postfix-4xx-expired.eml": [
        ("bounced", M + "D", "busy@remote.test", "quota", False, (452, "4.2.2"))
    ],
    "postfix-552-data-too-large.eml": [
        ("bounced", M + "E", "big@remote.test", "message-too-large", True, (552, "5.3.4"))
    ],
    "postfix-delayed.eml": [],
    "postfix-relayed.eml": [],
    "rfc3464-multi-recipient.eml": [
        ("bounced", M + "H", "jdoe@example.net", "bad-mailbox", True, (550, "5.1.1"))
    ],
    "rfc3464-gateway-non-smtp.eml": [
        ("bounced", M + "J", "pat.smith@example.org", "inactive-mailbox", True, (550, "5.2.1"))
    ],
    "dsn-gmail-multiline.eml": [
        (
            "bounced",
            M + "K",
            "no.such.person.4711@gmail.example",
            "bad-mailbox",
            True,
            (550, "5.1.1"),
        )
    ],
    "dsn-exchange-base64-status.eml": [
        (
            "bounced",
            M + "M",
            "former.employee@contoso.example",
            "bad-mailbox",
            True,
            (550, "5.4.1"),
        )
    ],
    "rfc5965-arf-abuse.eml": [
        ("complained", M + "N", "reader42@example.com", "complaint", None, None)
    ],
    "arf-redacted-headers-only.eml": [
        ("complained", M + "P", "reader7@hotmail.example", "complaint", None, None)
    ],
    "plain-qmail.eml": [
        ("bounced", M + "Q", "anna@example.de", "bad-mailbox", True, (550, "5.1.1")),
        ("bounced", M + "Q", "max@partner.example.at", "quota", True, (552, "5.2.2")),
    ],
    "plain-exim.eml": [
        ("bounced", M + "R", "gone@example.co.uk", "inactive-mailbox", True, (550, "5.2.1"))
    ],
    "plain-exchange.eml": [
        ("bounced", M + "S", "j.meier@fabrikam.example", "bad-mailbox", True, (550, "5.1.1")),
        ("bounced", M + "S", "k.wagner@fabrikam.example", "quota", True, (554, "5.2.2")),
    ],
    "plain-gmail-address-not-found.eml": [
        ("bounced", M + "F", "old.friend@gmail.example", "bad-mailbox", True, (550, "5.1.1"))
    ],
    "plain-postfix-notification-only.eml": [
        ("bounced", M + "B", "blocked@remote.test", "spam-blocked", True, (554, "5.7.1")),
        ("bounced", M + "B", "full@remote.test", "quota", True, (552, "5.2.2")),
    ],
    "unparsed-autoreply.eml": [("unparsed", "rpt-1", "", None, None, None)],
    "unparsed-broken-mime.eml": [("unparsed", "rpt-1", "", None, None, None)],
}


def receive(data: bytes, rcpt: str | None = None) -> tuple[str, list[DeliveryEvent], list[bytes]]:
    """Process a report as the SMTP listener does: (verdict, events, raw bytes kept)."""
    if rcpt is None:
        rcpt = email.utils.parseaddr(message_from_bytes(data)["To"] or "")[1]
    result, outputs = process(POLICY, data, "", [rcpt], "192.0.2.9", "rpt-1", NOW)
    events = [
        DeliveryEvent.model_validate_json(o.value or b"") for o in outputs if o.topic == EVENTS
    ]
    kept = [o.value or b"" for o in outputs if o.topic == REJECTED]
    return result.verdict, events, kept


def test_every_fixture_has_an_expectation() -> None:
    assert sorted(p.name for p in FIXTURES.glob("*.eml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_events(name: str) -> None:
    data = (FIXTURES / name).read_bytes()
    verdict, events, kept = receive(data)
    got = [
        (
            e.type.value,
            e.message_id,
            e.recipient,
            e.category.value if e.category else None,
            e.hard,
            (e.smtp.code, e.smtp.enhanced) if e.smtp else None,
        )
        for e in events
    ]
    assert got == EXPECTED[name]
    for event in events:
        assert event.ts == NOW and event.attempt == 0
        assert event.tenant == ("acme" if event.type.value != "unparsed" else event.tenant)
    if verdict == "unparsed":
        assert kept == [data], "the raw report is kept, byte for byte"
    else:
        assert kept == []


def test_the_unparsed_autoreply_to_a_return_path_names_the_message() -> None:
    _, (event,), _ = receive((FIXTURES / "unparsed-autoreply.eml").read_bytes())
    assert event.tenant == "acme" and M + "A" in (event.detail or "")
    assert "mail.rejected, key rpt-1" in (event.detail or "")


def test_reports_signed_with_another_key_match_nothing() -> None:
    """The same real reports, but the VERP signature is not ours: nothing is attributed."""
    other = Policy(**{**POLICY.__dict__, "keys": Keys(b"another-verp-key-0000000000", b"k" * 20)})
    for name, rows in EXPECTED.items():
        data = (FIXTURES / name).read_bytes()
        rcpt = email.utils.parseaddr(message_from_bytes(data)["To"] or "")[1]
        _, outputs = process(other, data, "", [rcpt], "192.0.2.9", "rpt-2", NOW)
        events = [
            DeliveryEvent.model_validate_json(o.value or b"") for o in outputs if o.topic == EVENTS
        ]
        assert all(e.type.value in ("unmatched", "unparsed") for e in events), name
        assert all(e.tenant == "" and e.message_id == "rpt-2" for e in events), name
        found = [(e.recipient, e.category) for e in events if e.type.value == "unmatched"]
        assert found == [(r[2], r[3]) for r in rows if r[0] != "unparsed"], name


def test_the_return_path_in_the_returned_original_matches_too() -> None:
    """Postfix returns the original with its Return-Path: the VERP address, signed."""
    data = (FIXTURES / "postfix-550-user-unknown.eml").read_bytes()
    _, (event,), _ = receive(data, rcpt=f"bounces@{BOUNCE_DOMAIN}")
    assert (event.type.value, event.message_id, event.tenant) == ("bounced", M + "A", "acme")
    assert "matched by original return path" in (event.detail or "")


def test_unmatched_tells_the_message_id_it_quoted() -> None:
    data = (FIXTURES / "postfix-550-user-unknown.eml").read_bytes()
    data = re.sub(rb"(?m)^Return-Path: .*\r\n", b"", data)
    _, (event,), _ = receive(data, rcpt=f"bounces@{BOUNCE_DOMAIN}")
    assert event.type.value == "unmatched" and event.recipient == "nosuch@remote.test"
    assert event.smtp is not None and event.smtp.enhanced == "5.1.1"
    assert "01J9Z6Q3V4T8K2M5N7P9R1S3TA" in (event.detail or "")


def _dsn(headers: str, rcpt: str, status: str, diagnostic: str, action: str = "failed") -> bytes:
    return (
        "From: MAILER-DAEMON@mx.example\r\nTo: bounces@" + BOUNCE_DOMAIN + "\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nSorry.\r\n\r\n"
        "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n\r\n"
        "--b\r\nContent-Type: text/rfc822-headers\r\n\r\n" + headers + "\r\n--b--\r\n"
    ).encode()


def _original(rcpt: str, message_id: str = "0193a5c2e1f04b7d9a8c6e5f4d3c2b1a", **extra: str) -> str:
    token = encode_token("acme", message_id, rcpt, UNSUBSCRIBE_KEY)
    lines = [
        "From: news@acme.example",
        f"To: {rcpt}",
        f"Message-ID: <{message_id}.0@acme.example>",
        f"List-Unsubscribe: <https://mail.example/v1/unsubscribe/{token}>",
        *(f"{k}: {v}" for k, v in extra.items()),
    ]
    return "\r\n".join(lines) + "\r\n"


#: One real-world reply per category: what the report says → what the event says.
CATEGORY_REPLIES = [
    ("5.1.1", "550 5.1.1 <{r}>: Recipient address rejected: User unknown", "bad-mailbox", True),
    ("5.1.2", "550 5.1.2 Host or domain name not found", "bad-domain", True),
    (
        "5.2.1",
        "550 5.2.1 The email account that you tried to reach is disabled",
        "inactive-mailbox",
        True,
    ),
    ("5.2.2", "552 5.2.2 Mailbox full", "quota", True),
    ("5.3.4", "552 5.3.4 Message size exceeds fixed limit", "message-too-large", True),
    (
        "5.7.1",
        "554 5.7.1 Service unavailable; client host blocked using zen.spamhaus.org",
        "spam-blocked",
        True,
    ),
    (
        "5.7.26",
        "550 5.7.26 Unauthenticated email is not accepted due to domain's DMARC policy",
        "policy",
        True,
    ),
    (
        "4.7.28",
        "421 4.7.28 Our system has detected an unusual rate of unsolicited mail",
        "spam-blocked",
        False,
    ),
    ("4.4.7", "451 4.4.7 Delivery time expired", "expired", False),
    ("4.2.2", "452 4.2.2 Mailbox over quota", "quota", False),
    ("5.6.0", "554 5.6.0 Message contains a virus", "content-rejected", True),
    ("5.4.4", "550 5.4.4 Unable to route", "routing", True),
    ("5.5.2", "500 5.5.2 Syntax error", "protocol", True),
    ("4.3.0", "451 4.3.0 Temporary local problem - please try later", "transient", False),
    ("4.7.0", "450 4.7.0 rate limited, try again later", "throttled", False),
    ("5.0.0", "550 5.0.0 something odd", "other", True),
]


@pytest.mark.parametrize(("status", "reply", "category", "hard"), CATEGORY_REPLIES)
def test_each_category_from_a_dsn(status: str, reply: str, category: str, hard: bool) -> None:
    rcpt = "reader@example.org"
    data = _dsn(_original(rcpt), rcpt, status, reply.format(r=rcpt))
    verdict, (event,), _ = receive(data, rcpt=f"bounces@{BOUNCE_DOMAIN}")
    assert verdict == "bounce" and event.type.value == "bounced"
    assert (event.category, event.hard) == (category, hard)
    assert event.smtp is not None and event.smtp.enhanced == status


def test_the_one_click_token_names_the_address_we_sent_to() -> None:
    """Forwarded mail: the report names the final mailbox, the token the address we mailed."""
    data = _dsn(
        _original("Old.Name@example.org"),
        "new.name@elsewhere.example",
        "5.1.1",
        "550 5.1.1 unknown",
    )
    _, (event,), _ = receive(data, rcpt=f"fbl@{BOUNCE_DOMAIN}")
    assert event.recipient == "Old.Name@example.org" and event.tenant == "acme"
    assert event.message_id == "0193a5c2e1f04b7d9a8c6e5f4d3c2b1a"


def test_a_return_path_beats_a_pasted_token_of_another_message() -> None:
    rcpt = "reader@example.org"
    verp = encode_return_path(
        "0193a5c2e1f04b7d9a8c6e5f4d3c2b1b", 4, BOUNCE_DOMAIN, "globex", FIXTURE_VERP_KEY
    )
    data = _dsn(_original(rcpt), rcpt, "5.1.1", "550 5.1.1 unknown")
    _, (event,), _ = receive(data, rcpt=verp)
    assert (event.message_id, event.tenant) == ("0193a5c2e1f04b7d9a8c6e5f4d3c2b1b", "globex")


SIGNED_ID = "0193a5c2e1f04b7d9a8c6e5f4d3c2b1c"


def _signed(message_id: str = SIGNED_ID, index: int = 2, tenant: str = "globex") -> str:
    """The Message-ID the sender writes on this recipient's copy, signed with the fixtures' key."""
    return encode_message_id(
        message_id, index, tenant, "acme.example", BOUNCE_DOMAIN, FIXTURE_VERP_KEY
    )


@pytest.mark.parametrize("tenant", ["globex", "a-tenant-with-a-32-character-nam"])
def test_a_signed_message_id_alone_names_message_and_tenant(tenant: str) -> None:
    """No VERP (a shared `bounces@` return path), no Return-Path, no one-click token."""
    headers = f"From: news@acme.example\r\nMessage-ID: {_signed(tenant=tenant)}\r\n"
    data = _dsn(headers, "Reader@Example.org", "5.1.1", "550 5.1.1 unknown")
    verdict, (event,), _ = receive(data, rcpt=f"bounces@{BOUNCE_DOMAIN}")
    assert verdict == "bounce" and event.type.value == "bounced"
    assert (event.message_id, event.tenant) == (SIGNED_ID, tenant)
    assert event.recipient == "Reader@example.org" and event.category == "bad-mailbox"
    assert "matched by original message-id" in (event.detail or "")


@pytest.mark.parametrize(
    "message_id",
    [
        f"<{SIGNED_ID}.0@acme.example>",  # the unsigned shape the sender wrote before
        _signed().replace("-globex@", "-acme@"),
        _signed()[:6] + ("a" if _signed()[6] != "a" else "b") + _signed()[7:],
        encode_message_id(SIGNED_ID, 2, "globex", "acme.example", BOUNCE_DOMAIN, b"k" * 32),
        "<" + encode_return_path(SIGNED_ID, 2, BOUNCE_DOMAIN, "globex", FIXTURE_VERP_KEY) + ">",
    ],
    ids=["unsigned", "tenant-swapped", "tag-changed", "other-key", "return-path"],
)
def test_an_unsigned_or_tampered_message_id_matches_nothing(message_id: str) -> None:
    headers = f"From: news@acme.example\r\nMessage-ID: {message_id}\r\n"
    data = _dsn(headers, "reader@example.org", "5.1.1", "550 5.1.1 unknown")
    verdict, (event,), _ = receive(data, rcpt=f"bounces@{BOUNCE_DOMAIN}")
    assert verdict == "unmatched" and event.type.value == "unmatched"
    assert (event.tenant, event.message_id, event.recipient) == ("", "rpt-1", "reader@example.org")
    shown = SIGNED_ID if message_id.startswith(f"<{SIGNED_ID}.") else message_id.strip("<>")
    assert f"original message id {shown} not verifiable as ours" in (event.detail or "")


def test_a_signed_message_id_borrows_the_one_click_address() -> None:
    """Forwarded mail: the report names the final mailbox, the token the address we mailed."""
    rcpt = "Old.Name@example.org"
    token = encode_token("globex", SIGNED_ID, rcpt, UNSUBSCRIBE_KEY)
    headers = (
        f"From: news@acme.example\r\nMessage-ID: {_signed()}\r\n"
        f"List-Unsubscribe: <https://mail.example/v1/unsubscribe/{token}>\r\n"
    )
    data = _dsn(headers, "new.name@elsewhere.example", "5.1.1", "550 5.1.1 unknown")
    _, (event,), _ = receive(data, rcpt=f"bounces@{BOUNCE_DOMAIN}")
    assert (event.message_id, event.tenant, event.recipient) == (SIGNED_ID, "globex", rcpt)
    assert "matched by original message-id" in (event.detail or "")


def test_a_message_id_whose_tenant_the_one_click_token_contradicts_does_not_decide() -> None:
    token = encode_token("acme", SIGNED_ID, "reader@example.org", UNSUBSCRIBE_KEY)
    headers = (
        f"Message-ID: {_signed(tenant='globex')}\r\n"
        f"List-Unsubscribe: <https://mail.example/v1/unsubscribe/{token}>\r\n"
    )
    data = _dsn(headers, "reader@example.org", "5.1.1", "550 5.1.1 unknown")
    _, (event,), _ = receive(data, rcpt=f"bounces@{BOUNCE_DOMAIN}")
    assert (event.message_id, event.tenant) == (SIGNED_ID, "acme")
    assert "matched by list-unsubscribe" in (event.detail or "")


def test_a_shared_copy_message_id_leaves_the_recipients_to_the_report() -> None:
    """One transaction for several recipients: the Message-ID names the first of them only."""
    headers = f"From: news@acme.example\r\nMessage-ID: {_signed(index=0)}\r\n"
    data = _dsn(headers, "first@example.org", "5.1.1", "550 5.1.1 unknown").replace(
        b"\r\n\r\n--b\r\nContent-Type: text/rfc822-headers",
        b"\r\n\r\nFinal-Recipient: rfc822; third@example.org\r\nAction: failed\r\n"
        b"Status: 5.2.2\r\nDiagnostic-Code: smtp; 552 5.2.2 Mailbox full\r\n"
        b"\r\n--b\r\nContent-Type: text/rfc822-headers",
    )
    _, events, _ = receive(data, rcpt=f"bounces@{BOUNCE_DOMAIN}")
    assert [(e.type.value, e.message_id, e.tenant, e.recipient, e.category) for e in events] == [
        ("bounced", SIGNED_ID, "globex", "first@example.org", "bad-mailbox"),
        ("bounced", SIGNED_ID, "globex", "third@example.org", "quota"),
    ]


def test_the_return_path_comes_before_the_message_id() -> None:
    other = "0193a5c2e1f04b7d9a8c6e5f4d3c2b1d"
    verp = encode_return_path(other, 4, BOUNCE_DOMAIN, "acme", FIXTURE_VERP_KEY)
    headers = f"Message-ID: {_signed()}\r\n"
    data = _dsn(headers, "reader@example.org", "5.1.1", "550 5.1.1 unknown")
    _, (event,), _ = receive(data, rcpt=verp)
    assert (event.message_id, event.tenant) == (other, "acme")
    assert "matched by verp" in (event.detail or "")
    quoted = _dsn(f"Return-Path: <{verp}>\r\n{headers}", "r@example.org", "5.1.1", "550 x")
    _, (event,), _ = receive(quoted, rcpt=f"bounces@{BOUNCE_DOMAIN}")
    assert (event.message_id, event.tenant) == (other, "acme")
    assert "matched by original return path" in (event.detail or "")


def test_a_return_path_too_long_for_its_tenant_is_matched_by_the_message_id() -> None:
    """A tenant over 19 characters does not fit in the VERP local part; the Message-ID has it."""
    tenant = "a-tenant-with-a-32-character-nam"
    verp = encode_return_path(SIGNED_ID, 2, BOUNCE_DOMAIN, tenant, FIXTURE_VERP_KEY)
    assert verp.count("-") == 1, "no tenant in the return path"
    headers = f"Message-ID: {_signed(tenant=tenant)}\r\n"
    data = _dsn(headers, "reader@example.org", "5.1.1", "550 5.1.1 unknown")
    _, (event,), _ = receive(data, rcpt=verp)
    assert (event.type.value, event.message_id, event.tenant) == ("bounced", SIGNED_ID, tenant)
    assert "matched by original message-id" in (event.detail or "")


def test_not_spam_and_auth_failure_reports_are_no_complaints() -> None:
    data = (FIXTURES / "rfc5965-arf-abuse.eml").read_bytes()
    for kind in (b"not-spam", b"auth-failure"):
        verdict, events, _ = receive(
            data.replace(b"Feedback-Type: abuse", b"Feedback-Type: " + kind)
        )
        assert events == [] and verdict.startswith("ignored")


def test_an_unsubscribe_by_mail_needs_a_valid_token() -> None:
    token = encode_token(
        "acme", "0193a5c2e1f04b7d9a8c6e5f4d3c2b1a", "reader@example.org", UNSUBSCRIBE_KEY
    )
    mail = f"From: reader@example.org\r\nSubject: unsubscribe {token}\r\n\r\n\r\n".encode()
    verdict, (event,), kept = receive(mail, rcpt=f"Unsubscribe@{BOUNCE_DOMAIN}")
    assert verdict == "unsubscribe" and kept == []
    assert (event.type.value, event.tenant, event.recipient) == (
        "unsubscribed",
        "acme",
        "reader@example.org",
    )
    forged = mail.replace(token[-6:].encode(), b"AAAAAA")
    verdict, (event,), kept = receive(forged, rcpt=f"unsubscribe@{BOUNCE_DOMAIN}")
    assert verdict == "unparsed" and kept == [forged]


def test_events_are_valid_json_on_the_topic() -> None:
    data = (FIXTURES / "postfix-550-user-unknown.eml").read_bytes()
    rcpt = email.utils.parseaddr(message_from_bytes(data)["To"] or "")[1]
    _, outputs = process(POLICY, data, "", [rcpt], "192.0.2.9", "rpt-1", NOW)
    (output,) = outputs
    assert output.key == M + "A", "keyed by message id, like every event of the message"
    assert json.loads(output.value or b"")["type"] == "bounced"
