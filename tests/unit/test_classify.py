"""Bounce classification: one case per built-in rule, and the properties suppression relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from schemas.categories import ADDRESS_CATEGORIES, Category
from services.bounce.classify import (
    BUILTIN_RULES_PATH,
    DEFAULT_CLASSIFIER,
    DEFAULT_RULE_ID,
    Classification,
    classify,
    load_rules,
    parse_reply,
    suppresses,
)

C = Category

# (rule id, code, enhanced, text, category, hard): replies as real servers word them.
# fmt: off
CASES: list[tuple[str, int | None, str | None, str, Category, bool]] = [
    ("enh-x.1.1-bad-mailbox", 550, "5.1.1", "<a@b.example>: Recipient address rejected: User unknown in virtual mailbox table", C.BAD_MAILBOX, True),
    ("enh-x.1.2-bad-domain", 550, "5.1.2", "Host unknown", C.BAD_DOMAIN, True),
    ("enh-x.1.3-bad-mailbox", 501, "5.1.3", "Bad recipient address syntax", C.BAD_MAILBOX, True),
    ("enh-x.1.4-bad-mailbox", 550, "5.1.4", "Destination mailbox address ambiguous", C.BAD_MAILBOX, True),
    ("enh-x.1.6-inactive", 550, "5.1.6", "Recipient no longer on server", C.INACTIVE_MAILBOX, True),
    ("enh-x.1.7-sender", 553, "5.1.7", "Sender address rejected: malformed", C.OTHER, True),
    ("enh-x.1.8-sender", 553, "5.1.8", "Sender address rejected: Domain not found", C.OTHER, True),
    ("enh-x.1.10-recipient-not-found", 550, "5.1.10", "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup", C.BAD_MAILBOX, True),
    ("enh-x.1.10-null-mx", 556, "5.1.10", "Recipient address has null MX", C.BAD_DOMAIN, True),
    ("enh-x.2.1-inactive", 550, "5.2.1", "The email account that you tried to reach is disabled.", C.INACTIVE_MAILBOX, True),
    ("enh-x.2.2-quota", 552, "5.2.2", "The recipient's inbox is out of storage space.", C.QUOTA, True),
    ("enh-x.2.3-too-large", 552, "5.2.3", "Message length exceeds administrative limit", C.MESSAGE_TOO_LARGE, True),
    ("enh-x.2.4-list-expansion", 550, "5.2.4", "Mailing list expansion problem", C.OTHER, True),
    ("enh-x.3.1-system-full", 452, "4.3.1", "Insufficient system storage", C.QUOTA, False),
    ("enh-x.3.2-not-accepting", 453, "4.3.2", "System not accepting network messages", C.TRANSIENT, False),
    ("enh-x.3.3-features", 554, "5.3.3", "System not capable of selected features", C.PROTOCOL, True),
    ("enh-x.3.4-too-large", 552, "5.3.4", "Message size exceeds fixed limit", C.MESSAGE_TOO_LARGE, True),
    ("enh-x.4.1-ms-dbeb", 550, "5.4.1", "Recipient address rejected: Access denied. AS(201806281)", C.BAD_MAILBOX, True),
    ("enh-x.4.1-no-answer", 451, "4.4.1", "No answer from host", C.TRANSIENT, False),
    ("enh-x.4.2-bad-connection", 421, "4.4.2", "Connection dropped", C.TRANSIENT, False),
    ("enh-x.4.4-no-domain", None, "5.4.4", "Host or domain name not found. Name service error for name=nx.example type=A: Host not found", C.BAD_DOMAIN, True),
    ("enh-x.4.5-congestion", 451, "4.4.5", "Mail system congestion", C.TRANSIENT, False),
    ("enh-x.4.7-expired", None, "4.4.7", "delivery time expired", C.EXPIRED, False),
    ("enh-4.5.3-too-many-recipients", 452, "4.5.3", "Too many recipients", C.THROTTLED, False),
    ("enh-x.5.0-mailbox-unavailable", 550, "5.5.0", "Requested action not taken: mailbox unavailable (S2017062302)", C.BAD_MAILBOX, True),
    ("enh-x.7.1-spam", 554, "5.7.1", "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org", C.SPAM_BLOCKED, True),
    ("enh-5.7.1-policy", 550, "5.7.1", "Relaying denied", C.POLICY, True),
    ("enh-x.7.17-owner-changed", 550, "5.7.17", "Mailbox owner has changed", C.BAD_MAILBOX, True),
    ("enh-x.7.18-domain-owner-changed", 550, "5.7.18", "Domain owner has changed", C.BAD_DOMAIN, True),
    ("enh-x.4.x-routing", 554, "5.4.6", "Routing loop detected", C.ROUTING, True),
    ("enh-x.5.x-protocol", 503, "5.5.1", "Bad sequence of commands", C.PROTOCOL, True),
    ("enh-x.6.x-content", 554, "5.6.0", "Message contains a prohibited attachment", C.CONTENT_REJECTED, True),
    ("enh-x.7.x-spam", 421, "4.7.28", "Our system has detected an unusual rate of unsolicited mail originating from your IP address", C.SPAM_BLOCKED, False),
    ("enh-4.7.x-greylisted", 450, "4.7.1", "Recipient address rejected: Greylisted, see https://postgrey.example/", C.TRANSIENT, False),
    ("enh-4.7.x-throttled", 421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints", C.THROTTLED, False),
    ("enh-5.7.x-policy", 550, "5.7.26", "Unauthenticated email from example.com is not accepted due to domain's DMARC policy", C.POLICY, True),
    ("text-blocked", 550, None, "Rejected: 192.0.2.1 is on our blacklist", C.SPAM_BLOCKED, True),
    ("text-rate-limited", 450, None, "Too many messages from your IP, rate limited", C.THROTTLED, False),
    ("text-too-many-connections", 421, None, "Too many concurrent SMTP connections from this IP address; please try again later.", C.THROTTLED, False),
    ("text-greylisted", 451, None, "Greylisting in action, please come back later", C.TRANSIENT, False),
    ("text-inactive", 550, None, "Recipient account is inactive", C.INACTIVE_MAILBOX, True),
    ("text-no-mailbox", 550, None, "No such user here", C.BAD_MAILBOX, True),
    ("text-no-domain", 550, None, 'unrouteable mail domain "example.invalid"', C.BAD_DOMAIN, True),
    ("text-quota", 452, None, "User is over quota", C.QUOTA, False),
    ("text-too-large", 552, None, "Message size exceeds maximum permitted", C.MESSAGE_TOO_LARGE, True),
    ("text-content", 550, None, "Virus found in message", C.CONTENT_REJECTED, True),
    ("text-authentication", 550, None, "SPF check failed", C.POLICY, True),
    ("text-relay-denied", 554, None, "Relay access denied", C.POLICY, True),
    ("text-policy", 550, None, "Message rejected due to local policy", C.POLICY, True),
    ("text-expired", None, None, "Message expired after 5 days in queue", C.EXPIRED, False),
    ("text-routing", 554, None, "Too many hops", C.ROUTING, True),
    ("text-protocol", 500, None, "Syntax error, command unrecognized", C.PROTOCOL, True),
    ("text-connection", None, None, "Connection timed out", C.TRANSIENT, False),
    ("text-try-again", 451, None, "Temporary local problem - please try later", C.TRANSIENT, False),
    ("code-552-storage", 552, None, "Requested mail action aborted", C.QUOTA, True),
    ("code-4xx", 450, None, "Requested mail action not taken", C.TRANSIENT, False),
    ("code-5xx", 554, None, "Transaction failed", C.OTHER, True),
    (DEFAULT_RULE_ID, None, None, "something odd happened", C.OTHER, False),
]
# fmt: on

# Ways servers say the sender is blocked; each must veto an address category.
BLOCK_PHRASES = [
    "blocked using zen.spamhaus.org",
    "listed on Spamhaus SBL",
    "IP address is on a blocklist",
    "sender is blacklisted",
    "rejected by DNSBL",
    "found on RBL",
    "Client host blocked",
    "poor IP reputation",
    "bad sender reputation",
    "message looks like spam",
    "unsolicited mail",
    "Barracuda Reputation",
]


@pytest.mark.parametrize(("rule", "code", "enhanced", "text", "category", "hard"), CASES)
def test_each_rule(
    rule: str, code: int | None, enhanced: str | None, text: str, category: Category, hard: bool
) -> None:
    assert classify(code, enhanced, text) == Classification(category, hard, rule)


def test_every_builtin_rule_has_a_case() -> None:
    ids = [rule["id"] for rule in yaml.safe_load(BUILTIN_RULES_PATH.read_text())["rules"]]
    assert sorted(ids) == sorted(case[0] for case in CASES if case[0] != DEFAULT_RULE_ID)


@pytest.mark.parametrize("phrase", BLOCK_PHRASES)
@pytest.mark.parametrize("enhanced", ["5.1.1", "5.1.0", "5.0.0", "5.7.1", "5.5.0", "5.4.1", None])
def test_blocked_reply_never_suppresses(phrase: str, enhanced: str | None) -> None:
    c = classify(550, enhanced, f"Recipient address rejected: user unknown; {phrase}")
    assert c.category not in ADDRESS_CATEGORIES
    assert c.hard and not suppresses(c)


@given(
    code=st.integers(500, 599),
    enhanced=st.sampled_from(["5.1.1", "5.1.2", "5.2.1", "5.1.10", "5.7.1", "5.0.0", None]),
    phrase=st.sampled_from(BLOCK_PHRASES),
    before=st.text(max_size=60),
    after=st.text(max_size=60),
)
def test_blocked_is_not_bad_mailbox(
    code: int, enhanced: str | None, phrase: str, before: str, after: str
) -> None:
    c = classify(code, enhanced, f"{before} {phrase} {after}")
    assert c.category not in ADDRESS_CATEGORIES and not suppresses(c)


@given(
    code=st.integers(400, 499),
    enhanced=st.one_of(st.none(), st.from_regex(r"\A[45]\.[0-9]{1,3}\.[0-9]{1,3}\Z")),
    text=st.text(max_size=120),
)
def test_a_4xx_is_never_hard(code: int, enhanced: str | None, text: str) -> None:
    c = classify(code, enhanced, text)
    assert not c.hard and not suppresses(c)


@given(code=st.one_of(st.none(), st.integers(-5, 1000)), enhanced=st.text(), text=st.text())
def test_any_input_classifies(code: int | None, enhanced: str, text: str) -> None:
    assert isinstance(classify(code, enhanced, text).category, Category)


def test_suppresses_only_hard_address_failures() -> None:
    assert suppresses(Classification(C.BAD_MAILBOX, True, "r"))
    assert suppresses(Classification(C.INACTIVE_MAILBOX, True, "r"))
    assert not suppresses(Classification(C.BAD_MAILBOX, False, "r"))
    assert not suppresses(Classification(C.SPAM_BLOCKED, True, "r"))
    assert not suppresses(Classification(C.POLICY, True, "r"))


def test_codes_are_read_from_the_text_when_not_given() -> None:
    gmail = (
        "550-5.1.1 The email account that you tried to reach does not exist. Please try\n"
        "550-5.1.1 double-checking the recipient's email address for typos or\n"
        "550 5.1.1 unnecessary spaces."
    )
    assert classify(None, None, gmail) == Classification(
        C.BAD_MAILBOX, True, "enh-x.1.1-bad-mailbox"
    )
    reply = parse_reply(gmail)
    assert (reply.code, reply.enhanced) == (550, "5.1.1")
    assert reply.text.startswith("The email account") and "550" not in reply.text


def test_explicit_codes_win_over_the_text() -> None:
    assert classify(451, "4.2.2", "550 5.1.1 user unknown").hard is False


def test_parse_reply_keeps_numbers_inside_the_text() -> None:
    assert parse_reply("552 message size 552 bytes too large").text == (
        "message size 552 bytes too large"
    )
    assert parse_reply("5.1.1 bad mailbox") == parse_reply("5.1.1 bad mailbox")
    assert parse_reply("5.1.1 bad mailbox").enhanced == "5.1.1"


def test_default_classifier_is_the_builtin_rules() -> None:
    assert [r.id for r in DEFAULT_CLASSIFIER.rules] == [r.id for r in load_rules().rules]


def _write(tmp_path: Path, rules: list[dict[str, object]]) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"rules": rules}))
    return path


def test_operator_rules_come_first_and_replace_by_id(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        [
            {
                "id": "acme-blacklisted-retry",
                "text": "blacklisted",
                "category": "spam-blocked",
                "hard": False,
            },
            {
                "id": "acme-5.1.1-then-text",
                "enhanced": "5.1.1",
                "text": "mailbox moved",
                "category": "inactive-mailbox",
            },
            {"id": "code-5xx", "code": "5xx", "category": "policy"},
        ],
    )
    classifier = load_rules(path)
    assert classifier.classify(550, None, "you are blacklisted") == Classification(
        C.SPAM_BLOCKED, False, "acme-blacklisted-retry"
    )
    assert classifier.classify(550, "5.1.1", "mailbox moved").rule == "acme-5.1.1-then-text"
    assert classifier.classify(550, "5.1.1", "user unknown").rule == "enh-x.1.1-bad-mailbox"
    assert classifier.classify(554, None, "nope") == Classification(C.POLICY, True, "code-5xx")
    assert sum(r.id == "code-5xx" for r in classifier.rules) == 1


def test_a_soft_rule_never_makes_a_4xx_hard(tmp_path: Path) -> None:
    classifier = load_rules(_write(tmp_path, [{"id": "x", "text": "zzz", "category": "other"}]))
    assert classifier.classify(450, None, "zzz") == Classification(C.OTHER, False, "x")
    assert classifier.classify(550, None, "zzz") == Classification(C.OTHER, True, "x")


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"id": "r1", "text": "x", "category": "nope"}, "category must be one of"),
        ({"id": "r1", "text": "(unclosed", "category": "other"}, "invalid text regex"),
        ({"id": "r1", "text": [], "category": "other"}, "non-empty list"),
        ({"id": "r1", "enhanced": "5.1", "category": "other"}, "enhanced must look like"),
        ({"id": "r1", "code": "55", "category": "other"}, "code must look like"),
        ({"id": "r1", "category": "other"}, "needs at least one of"),
        ({"id": "r1", "text": "x", "category": "other", "colour": 1}, "unknown keys"),
        ({"id": "r1", "text": "x", "category": "other", "hard": True}, "hard may only be false"),
        ({"id": "r1", "text": "x", "category": "bad-mailbox", "veto": True}, "address category"),
        ({"id": "r1", "code": "5xx", "category": "policy", "veto": True}, "text and nothing else"),
    ],
)
def test_invalid_rules_name_the_rule(tmp_path: Path, rule: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        load_rules(_write(tmp_path, [rule]))
    assert "'r1'" in str(info.value)


def test_invalid_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicate id"):
        load_rules(_write(tmp_path, [{"id": "a", "code": "5xx", "category": "other"}] * 2))
    with pytest.raises(ValueError, match="rule id"):
        load_rules(_write(tmp_path, [{"id": "Bad Id!", "code": "5xx", "category": "other"}]))
    (tmp_path / "list.yaml").write_text("- just a list\n")
    with pytest.raises(ValueError, match="'rules' list"):
        load_rules(tmp_path / "list.yaml")
    with pytest.raises(ValueError, match="cannot read"):
        load_rules(tmp_path / "missing.yaml")
