"""Report parsing: each fixture gives the recipients, statuses and ids a person reads in it."""

from __future__ import annotations

import email
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.categories import Category
from services.bounce.classify import classify
from services.bounce.reports import Report, parse_report
from services.bounce.verp import decode_return_path

FIXTURES = Path(__file__).parent.parent / "fixtures" / "reports"
#: The key the fixtures' VERP return paths were signed with (see the fixtures' README).
FIXTURE_VERP_KEY = b"mailrail-fixture-verp-key-0000000"

C = Category
# recipient: (final recipient, action, status, SMTP code, category from classify)
Rcpt = tuple[str, str | None, str | None, int | None, Category | None]
# file: (kind, recipients, original message id, envelope id, feedback type)
EXPECTED: dict[str, tuple[str, list[Rcpt], str | None, str | None, str | None]] = {
    "postfix-550-user-unknown.eml": (
        "dsn",
        [("nosuch@remote.test", "failed", "5.1.1", 550, C.BAD_MAILBOX)],
        "01J9Z6Q3V4T8K2M5N7P9R1S3TA@mailrail.test",
        None,
        None,
    ),
    "postfix-two-recipients-quota-and-block.eml": (
        "dsn",
        [
            ("blocked@remote.test", "failed", "5.7.1", 554, C.SPAM_BLOCKED),
            ("full@remote.test", "failed", "5.2.2", 552, C.QUOTA),
        ],
        "01J9Z6Q3V4T8K2M5N7P9R1S3TB@mailrail.test",
        None,
        None,
    ),
    "postfix-local-unknown-user.eml": (
        "dsn",
        [("nosuchuser@localhost", "failed", "5.1.1", None, C.BAD_MAILBOX)],
        "01J9Z6Q3V4T8K2M5N7P9R1S3TC@mailrail.test",
        None,
        None,
    ),
    "postfix-4xx-expired.eml": (
        "dsn",
        [("busy@remote.test", "failed", "4.2.2", 452, C.QUOTA)],
        "01J9Z6Q3V4T8K2M5N7P9R1S3TD@mailrail.test",
        None,
        None,
    ),
    "postfix-552-data-too-large.eml": (
        "dsn",
        [("big@remote.test", "failed", "5.3.4", 552, C.MESSAGE_TOO_LARGE)],
        "01J9Z6Q3V4T8K2M5N7P9R1S3TE@mailrail.test",
        "envid-01J9Z6Q3V4T8K2M5N7P9R1S3TE",
        None,
    ),
    "postfix-delayed.eml": (
        "dsn",
        [("busy@remote.test", "delayed", "4.2.2", 452, C.QUOTA)],
        "01J9Z6Q3V4T8K2M5N7P9R1S3TF@mailrail.test",
        None,
        None,
    ),
    "postfix-relayed.eml": (
        "dsn",
        [("ok@remote.test", "relayed", "2.0.0", 250, None)],
        "01J9Z6Q3V4T8K2M5N7P9R1S3TG@mailrail.test",
        None,
        None,
    ),
    "rfc3464-multi-recipient.eml": (
        "dsn",
        [
            ("jdoe@example.net", "failed", "5.1.1", 550, C.BAD_MAILBOX),
            ("sales@lists.example.org", "delayed", "4.4.1", 451, C.TRANSIENT),
            ("ops@example.net", "relayed", "2.0.0", 250, None),
        ],
        "01J9Z6Q3V4T8K2M5N7P9R1S3TH@mailrail.test",
        "01J9Z6Q3V4T8K2M5N7P9R1S3TH",
        None,
    ),
    "rfc3464-gateway-non-smtp.eml": (
        "dsn",
        [("pat.smith@example.org", "failed", "5.2.1", None, C.INACTIVE_MAILBOX)],
        "01J9Z6Q3V4T8K2M5N7P9R1S3TJ@mailrail.test",
        None,
        None,
    ),
    "dsn-gmail-multiline.eml": (
        "dsn",
        [("no.such.person.4711@gmail.example", "failed", "5.1.1", 550, C.BAD_MAILBOX)],
        "01J9Z6Q3V4T8K2M5N7P9R1S3TK@mailrail.test",
        None,
        None,
    ),
    "dsn-exchange-base64-status.eml": (
        "dsn",
        [("former.employee@contoso.example", "failed", "5.4.1", 550, C.BAD_MAILBOX)],
        "01J9Z6Q3V4T8K2M5N7P9R1S3TM@mailrail.test",
        None,
        None,
    ),
    "rfc5965-arf-abuse.eml": (
        "arf",
        [("reader42@example.com", None, None, None, None)],
        "01J9Z6Q3V4T8K2M5N7P9R1S3TN@mailrail.test",
        None,
        "abuse",
    ),
    "arf-redacted-headers-only.eml": (
        "arf",
        [("reader7@hotmail.example", None, None, None, None)],
        "01J9Z6Q3V4T8K2M5N7P9R1S3TP@mailrail.test",
        None,
        "abuse",
    ),
    "plain-qmail.eml": (
        "plain",
        [
            ("anna@example.de", "failed", "5.1.1", None, C.BAD_MAILBOX),
            ("max@partner.example.at", "failed", "5.2.2", 552, C.QUOTA),
        ],
        "01J9Z6Q3V4T8K2M5N7P9R1S3TQ@mailrail.test",
        None,
        None,
    ),
    "plain-exim.eml": (
        "plain",
        [("gone@example.co.uk", "failed", "5.2.1", 550, C.INACTIVE_MAILBOX)],
        "01J9Z6Q3V4T8K2M5N7P9R1S3TR@mailrail.test",
        None,
        None,
    ),
    "plain-exchange.eml": (
        "plain",
        [
            ("j.meier@fabrikam.example", "failed", "5.1.1", 550, C.BAD_MAILBOX),
            ("k.wagner@fabrikam.example", "failed", "5.2.2", 554, C.QUOTA),
        ],
        "01J9Z6Q3V4T8K2M5N7P9R1S3TS@mailrail.test",
        None,
        None,
    ),
    "plain-gmail-address-not-found.eml": (
        "plain",
        [("old.friend@gmail.example", "failed", "5.1.1", 550, C.BAD_MAILBOX)],
        None,
        None,
        None,
    ),
    "plain-postfix-notification-only.eml": (
        "plain",
        [
            ("blocked@remote.test", "failed", "5.7.1", 554, C.SPAM_BLOCKED),
            ("full@remote.test", "failed", "5.2.2", 552, C.QUOTA),
        ],
        None,
        None,
        None,
    ),
    "unparsed-autoreply.eml": ("unparsed", [], None, None, None),
    "unparsed-broken-mime.eml": ("unparsed", [], None, None, None),
}


def _parse(name: str) -> Report:
    return parse_report((FIXTURES / name).read_bytes())


def test_every_fixture_has_an_expectation() -> None:
    assert sorted(p.name for p in FIXTURES.glob("*.eml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture(name: str) -> None:
    kind, recipients, message_id, envelope_id, feedback_type = EXPECTED[name]
    report = _parse(name)
    assert report.kind == kind
    assert report.original_message_id == message_id
    assert report.original_envelope_id == envelope_id
    assert report.feedback_type == feedback_type
    got = [(r.final_recipient, r.action, r.status, r.diagnostic_code) for r in report.recipients]
    assert got == [r[:4] for r in recipients]
    for rcpt, (*_, category) in zip(report.recipients, recipients, strict=True):
        if category is not None:
            assert classify(
                rcpt.diagnostic_code, rcpt.status, rcpt.diagnostic_text or ""
            ).category == (category)
    if message_id is not None:
        assert report.original_headers["x-mailrail-tenant"] == "acme"


def test_dsn_details() -> None:
    report = _parse("rfc3464-multi-recipient.eml")
    assert report.reporting_mta == "mx1.example.net"
    assert report.arrival_date == "Mon, 14 Oct 2024 10:01:58 +0000"
    assert report.report_message_id == "202410141002.49EA2B9q011234@mx1.example.net"
    first, second, _ = report.recipients
    assert first.remote_mta == "mail.example.net"
    assert first.diagnostic_text == "<jdoe@example.net>... User unknown"
    assert second.original_recipient == "info@example.net"
    assert report.original_headers["x-mailrail-message-id"] == "01J9Z6Q3V4T8K2M5N7P9R1S3TH"


def test_folded_multiline_diagnostic_is_one_reply() -> None:
    (rcpt,) = _parse("dsn-gmail-multiline.eml").recipients
    assert rcpt.diagnostic_text is not None
    assert rcpt.diagnostic_text.startswith("The email account that you tried to reach")
    assert "550" not in rcpt.diagnostic_text
    assert rcpt.remote_mta == "gmail-smtp-in.l.google.example"


def test_postfix_local_diagnostic_keeps_its_text() -> None:
    (rcpt,) = _parse("postfix-local-unknown-user.eml").recipients
    assert rcpt.diagnostic_text == 'unknown user: "nosuchuser"'


def test_arf_details() -> None:
    report = _parse("rfc5965-arf-abuse.eml")
    assert report.original_mail_from == (
        "b-diaze7tlr5snejrkc2t3e4a4r5kqb53yaeihoge7tq-acme@bounce.mailrail.test"
    )
    assert report.arrival_date == "Thu, 17 Oct 2024 14:10:02 +0000"
    assert report.reporting_mta == "mail.example.com"
    assert report.original_headers["list-unsubscribe-post"] == "List-Unsubscribe=One-Click"


@pytest.mark.parametrize("name", [n for n, e in EXPECTED.items() if e[2] is not None])
def test_fixture_return_paths_decode(name: str) -> None:
    """Each report names a VERP return path signed for the message it reports on."""
    raw = (FIXTURES / name).read_bytes()
    report = parse_report(raw)
    candidates = [
        str(email.message_from_bytes(raw).get("to", "")),
        report.original_headers.get("return-path", ""),
        report.original_mail_from or "",
    ]
    tokens = [t for c in candidates if (t := decode_return_path(c, FIXTURE_VERP_KEY))]
    assert tokens
    for token in tokens:
        assert token.tenant == "acme" and token.recipient_index == 0
        assert report.original_message_id == f"{token.message_id}@mailrail.test"


def test_plain_delay_warning_is_not_a_failure() -> None:
    raw = (
        b"From: MAILER-DAEMON@mx.example\r\nSubject: Warning: message delayed\r\n\r\n"
        b"Your message has not yet been delivered to <slow@example.org>.\r\n"
        b"The server said: 451 4.3.0 Temporary failure, will keep trying\r\n"
    )
    (rcpt,) = parse_report(raw).recipients
    assert (rcpt.final_recipient, rcpt.action, rcpt.status, rcpt.diagnostic_code) == (
        "slow@example.org",
        "delayed",
        "4.3.0",
        451,
    )


def test_plain_mail_that_is_not_a_bounce_is_unparsed() -> None:
    raw = b"From: friend@example.org\r\nSubject: hi\r\n\r\nMail me at other@example.org, 550 5.1.1\r\n"
    assert parse_report(raw).kind == "unparsed"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4000))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    assert parse_report(data).kind in ("dsn", "arf", "plain", "unparsed")


_FIXTURE_BYTES = [p.read_bytes() for p in sorted(FIXTURES.glob("*.eml"))]


@settings(max_examples=300, deadline=None)
@given(
    source=st.sampled_from(_FIXTURE_BYTES),
    cut=st.floats(0, 1),
    edits=st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=8)), max_size=6),
)
def test_damaged_fixtures_never_raise(
    source: bytes, cut: float, edits: list[tuple[float, bytes]]
) -> None:
    data = bytearray(source[: max(1, int(len(source) * cut))] if cut < 0.5 else source)
    for where, junk in edits:
        at = int(len(data) * where)
        data[at : at + len(junk)] = junk
    report = parse_report(bytes(data))
    assert report.kind in ("dsn", "arf", "plain", "unparsed")
    assert all(isinstance(r.final_recipient, str | None) for r in report.recipients)
