"""Asynchronous bounces and complaints over SMTP, end to end through the running stack.

Each test sends real mail through ingest → router → sender → the loopback sink, takes the
message as it arrived, writes the report a receiving MTA would send back about it, delivers
that to the bounce service's SMTP listener with aiosmtplib, and checks what a user sees:
the events, the suppression list over HTTP, and the next message's 202 answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from email import message_from_bytes
from email.policy import default
from email.utils import make_msgid
from typing import Any

import aiosmtplib
import pytest
from confluent_kafka import Message

from schemas.records import suppression_key
from services.runtime.settings import split_host_port
from tests.integration.conftest import Stack, topic, unique
from tests.support.kafka import EventLog, TopicTail
from tests.support.smtp_server import ReceivedMessage

BOUNCE_DOMAIN = "bounces.mailrail.test"


def bounce_address(stack: Stack) -> tuple[str, int]:
    return split_host_port(stack.services["bounce"].env["MAILRAIL_BOUNCE_SMTP_ADDR"], 25)


def post(stack: Stack, to: str, subject: str = "hello") -> dict[str, Any]:
    with stack.client() as client:
        answer = client.post(
            "/v1/messages",
            json={"from": "News <news@acme.example>", "to": [to], "subject": subject, "text": "t"},
        )
    assert answer.status_code == 202, answer.text
    result: dict[str, Any] = answer.json()
    return result


def sent_to(stack: Stack, address: str, count: int = 1) -> list[ReceivedMessage]:
    """The copies of our mail that reached the sink for `address`, oldest first."""
    stack.sink.wait_for(lambda _: len(stack.sink.messages_for(address)) >= count, timeout_s=30)
    return stack.sink.messages_for(address)[:count]


def headers_of(message: ReceivedMessage) -> bytes:
    """The header block of a message as it arrived (what `text/rfc822-headers` returns)."""
    return message.data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def dsn(
    original_headers: bytes,
    recipient: str,
    to: str,
    *,
    status: str = "5.1.1",
    diagnostic: str = "smtp; 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown",
    action: str = "failed",
) -> bytes:
    """An RFC 3464 report as Postfix writes one, returning the original's headers."""
    fields = (
        f"Final-Recipient: rfc822; {recipient}\r\nOriginal-Recipient: rfc822;{recipient}\r\n"
        f"Action: {action}\r\nStatus: {status}\r\nRemote-MTA: dns; mail.remote.example\r\n"
        f"Diagnostic-Code: {diagnostic.format(rcpt=recipient)}\r\n"
    )
    return (
        (
            "From: MAILER-DAEMON@mx.remote.example (Mail Delivery System)\r\n"
            f"To: {to}\r\nSubject: Undelivered Mail Returned to Sender\r\n"
            f"Message-ID: {make_msgid(domain='mx.remote.example')}\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n\r\n'
            "--b1\r\nContent-Type: text/plain\r\n\r\n"
            "This is the mail system at host mx.remote.example. I'm sorry.\r\n\r\n"
            "--b1\r\nContent-Type: message/delivery-status\r\n\r\n"
            "Reporting-MTA: dns; mx.remote.example\r\n\r\n" + fields + "\r\n"
            "--b1\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        ).encode()
        + original_headers
        + b"\r\n--b1--\r\n"
    )


def arf(original: ReceivedMessage, recipient: str) -> bytes:
    """An RFC 5965 abuse report from a mailbox provider's feedback loop, with the original's
    headers as delivered (the receiving MTA added Return-Path)."""
    return (
        (
            "From: Feedback Loop <fbl@isp.example>\r\n"
            f"To: fbl@{BOUNCE_DOMAIN}\r\nSubject: Abuse report\r\n"
            f"Message-ID: {make_msgid(domain='isp.example')}\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=feedback-report; boundary="b2"\r\n\r\n'
            "--b2\r\nContent-Type: text/plain\r\n\r\n"
            "A user of ours marked this message as spam.\r\n\r\n"
            "--b2\r\nContent-Type: message/feedback-report\r\n\r\n"
            "Feedback-Type: abuse\r\nUser-Agent: ISP-FBL/1.0\r\nVersion: 1\r\n"
            f"Original-Rcpt-To: {recipient}\r\nReporting-MTA: dns; fbl.isp.example\r\n\r\n"
            "--b2\r\nContent-Type: text/rfc822-headers\r\n\r\n"
            f"Return-Path: <{original.mail_from}>\r\n"
        ).encode()
        + headers_of(original)
        + b"\r\n--b2--\r\n"
    )


def bounce_for(original: ReceivedMessage, recipient: str, **fields: str) -> bytes:
    """The report a remote MTA sends to the message's return path."""
    return dsn(headers_of(original), recipient, original.mail_from, **fields)


async def deliver(stack: Stack, data: bytes, rcpt: str, mail_from: str = "") -> str:
    """Deliver one report to the bounce listener; the server's final answer."""
    host, port = bounce_address(stack)
    async with aiosmtplib.SMTP(hostname=host, port=port, timeout=30) as smtp:
        await smtp.mail(mail_from)
        await smtp.rcpt(rcpt)
        response = await smtp.data(data)
    return f"{response.code} {response.message}"


def suppression_of(stack: Stack, address: str) -> dict[str, Any] | None:
    with stack.client() as client:
        answer = client.get(f"/v1/suppressions/{address}")
    if answer.status_code == 404:
        return None
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def wait_until(condition: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.2)
    raise TimeoutError("condition not met")


def of_type(events: EventLog, recipient: str, kind: str) -> list[Any]:
    return [e for e in events.events(recipient) if e.type.value == kind]


@pytest.fixture(scope="module")
def suppressions(stack: Stack) -> Any:
    tail = TopicTail(topic("mail.suppression"))
    yield tail
    tail.stop()


# --- the SMTP listener's front door ---------------------------------------------------


async def test_it_is_no_open_relay_and_knows_its_addresses(stack: Stack) -> None:
    first = post(stack, unique("door"))
    (original,) = sent_to(stack, first["recipients"][0]["email"])
    verp = original.mail_from
    local, _, domain = verp.partition("@")
    flipped = local[:5] + ("a" if local[5] != "a" else "b") + local[6:]
    host, port = bounce_address(stack)
    async with aiosmtplib.SMTP(hostname=host, port=port, timeout=30) as smtp:
        await smtp.mail("")
        replies = {}
        for rcpt in (
            "victim@example.com",
            f"someone@{BOUNCE_DOMAIN}",
            verp.replace("@", "x@", 1),
            f"{flipped}@{domain}",
            verp,
            verp.upper(),
            f"fbl@{BOUNCE_DOMAIN}",
            f"Postmaster@{BOUNCE_DOMAIN.upper()}",
            f"bounces@{BOUNCE_DOMAIN}",
        ):
            response = await smtp.execute_command(f"RCPT TO:<{rcpt}>".encode())
            replies[rcpt] = f"{response.code} {response.message}"
    values = list(replies.values())
    assert values[0].startswith("550 5.7.1") and "relay" in values[0], "no open relay"
    assert values[1].startswith("550 5.1.1"), "unknown local part"
    assert values[2].startswith("550 5.1.1"), "a VERP address with its signature changed"
    assert values[3].startswith("550 5.1.1")
    assert all(v.startswith("250") for v in values[4:]), replies


# --- bounces ------------------------------------------------------------------------------


async def test_a_dsn_to_the_return_path_bounces_and_suppresses_the_next_message(
    stack: Stack, events: EventLog
) -> None:
    address = unique("dsn-gone")
    first = post(stack, address, "first")
    (original,) = sent_to(stack, address)
    events.wait_types(address, {"delivered"})
    answer = await deliver(stack, bounce_for(original, address), original.mail_from)
    assert answer.startswith("250 2.0.0 report rpt-")
    (bounced,) = [e for e in events.wait_types(address, {"bounced"}) if e.type.value == "bounced"]
    assert bounced.message_id == first["id"] and bounced.tenant == "acme"
    assert bounced.category == "bad-mailbox" and bounced.hard is True and bounced.attempt == 0
    assert bounced.smtp is not None and (bounced.smtp.code, bounced.smtp.enhanced) == (550, "5.1.1")
    assert "Recipient address rejected" in bounced.smtp.text
    entry = wait_until(lambda: suppression_of(stack, address))
    assert entry["reason"].startswith("hard-bounce: 550 5.1.1")
    second = post(stack, address, "second")
    assert second["recipients"] == [{"email": address, "status": "suppressed"}]
    time.sleep(1)
    assert len(stack.sink.messages_for(address)) == 1, "the suppressed address got mail again"


async def test_a_dsn_to_a_shared_address_matches_by_the_original_headers(
    stack: Stack, events: EventLog
) -> None:
    address = unique("dsn-headers")
    first = post(stack, address)
    (original,) = sent_to(stack, address)
    report = dsn(headers_of(original), address, f"bounces@{BOUNCE_DOMAIN}")
    assert (await deliver(stack, report, f"bounces@{BOUNCE_DOMAIN}")).startswith("250")
    bounced = [e for e in events.wait_types(address, {"bounced"}) if e.type.value == "bounced"]
    assert bounced[0].message_id == first["id"] and bounced[0].tenant == "acme"
    # The signed Message-ID comes before the one-click token (whose address it borrows).
    assert "matched by original message-id" in (bounced[0].detail or "")
    wait_until(lambda: suppression_of(stack, address))


def message_id_of(message: ReceivedMessage) -> str:
    """The Message-ID the sender wrote on a copy that reached the sink."""
    value = str(message_from_bytes(message.data, policy=default)["Message-ID"])
    assert value.startswith("<b-") and value.endswith("-acme@acme.example>"), value
    return value


def only_message_id(message: ReceivedMessage, message_id: str) -> bytes:
    """Original headers whose only link to our mail is the Message-ID: no Return-Path, no
    List-Unsubscribe (as a shared copy, or mail sent without MAILRAIL_PUBLIC_URL, has)."""
    parsed = message_from_bytes(message.data, policy=default)
    return (
        f"From: {parsed['From']}\r\nTo: {parsed['To']}\r\nSubject: {parsed['Subject']}\r\n"
        f"Date: {parsed['Date']}\r\nMessage-ID: {message_id}\r\n"
    ).encode()


async def test_a_dsn_quoting_only_the_signed_message_id_bounces_and_suppresses(
    stack: Stack, events: EventLog
) -> None:
    address = unique("dsn-message-id")
    first = post(stack, address)
    (original,) = sent_to(stack, address)
    headers = only_message_id(original, message_id_of(original))
    assert b"List-Unsubscribe" not in headers and b"Return-Path" not in headers
    report = dsn(headers, address, f"bounces@{BOUNCE_DOMAIN}")
    assert (await deliver(stack, report, f"bounces@{BOUNCE_DOMAIN}")).startswith("250")
    (bounced,) = [e for e in events.wait_types(address, {"bounced"}) if e.type.value == "bounced"]
    assert (bounced.message_id, bounced.tenant, bounced.recipient) == (first["id"], "acme", address)
    assert bounced.category == "bad-mailbox" and bounced.hard is True
    assert "matched by original message-id" in (bounced.detail or "")
    entry = wait_until(lambda: suppression_of(stack, address))
    assert entry["reason"].startswith("hard-bounce: 550 5.1.1")
    assert post(stack, address, "second")["recipients"][0]["status"] == "suppressed"


async def test_a_dsn_quoting_an_altered_message_id_suppresses_nobody(
    stack: Stack, events: EventLog, suppressions: TopicTail
) -> None:
    victim, control = unique("dsn-altered-id"), unique("dsn-control")
    post(stack, victim)
    post(stack, control)
    (to_victim,) = sent_to(stack, victim)
    (to_control,) = sent_to(stack, control)
    real = message_id_of(to_victim)
    local = real[1:-1].partition("@")[0]
    at = local.rindex("-") - 3  # inside the tag, the last 8 bytes of the token
    altered = real.replace(local, local[:at] + ("a" if local[at] != "a" else "b") + local[at + 1 :])
    assert altered != real
    report = dsn(only_message_id(to_victim, altered), victim, f"bounces@{BOUNCE_DOMAIN}")
    answer = await deliver(stack, report, f"bounces@{BOUNCE_DOMAIN}")
    assert answer.startswith("250")
    (unmatched,) = wait_until(lambda: of_type(events, victim, "unmatched"))
    assert unmatched.tenant == "" and unmatched.message_id == answer.split()[3]
    assert unmatched.category == "bad-mailbox"
    assert altered.strip("<>") in (unmatched.detail or "")
    await deliver(stack, bounce_for(to_control, control), to_control.mail_from)
    wait_until(lambda: suppression_of(stack, control))
    assert suppression_of(stack, victim) is None
    assert not of_type(events, victim, "bounced")
    assert not [r for r in suppressions.records() if r.key() == _key(victim)]


async def test_a_block_is_a_bounce_but_never_suppresses(
    stack: Stack, events: EventLog, suppressions: TopicTail
) -> None:
    blocked, control = unique("dsn-blocked"), unique("dsn-control")
    post(stack, blocked)
    post(stack, control)
    (to_blocked,) = sent_to(stack, blocked)
    (to_control,) = sent_to(stack, control)
    spam = "smtp; 554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org"
    report = bounce_for(to_blocked, blocked, status="5.7.1", diagnostic=spam)
    await deliver(stack, report, to_blocked.mail_from)
    await deliver(stack, bounce_for(to_control, control), to_control.mail_from)
    bounced = [e for e in events.wait_types(blocked, {"bounced"}) if e.type.value == "bounced"]
    assert bounced[0].category == "spam-blocked" and bounced[0].hard is True
    wait_until(lambda: suppression_of(stack, control))
    assert suppression_of(stack, blocked) is None
    assert not [r for r in suppressions.records() if r.key() == _key(blocked)]


async def test_a_delay_notice_is_not_a_bounce(
    stack: Stack, events: EventLog, suppressions: TopicTail
) -> None:
    late, control = unique("dsn-late"), unique("dsn-control")
    post(stack, late)
    post(stack, control)
    (to_late,) = sent_to(stack, late)
    (to_control,) = sent_to(stack, control)
    delayed = bounce_for(
        to_late,
        late,
        action="delayed",
        status="4.2.2",
        diagnostic="smtp; 452 4.2.2 Mailbox over quota, try again later",
    )
    assert (await deliver(stack, delayed, to_late.mail_from)).startswith("250")
    await deliver(stack, bounce_for(to_control, control), to_control.mail_from)
    wait_until(lambda: suppression_of(stack, control))
    events.wait_types(late, {"delivered"})
    assert {e.type.value for e in events.events(late)} == {"accepted", "queued", "delivered"}


async def test_a_report_about_mail_we_never_sent_suppresses_nobody(
    stack: Stack, events: EventLog, suppressions: TopicTail
) -> None:
    """A DSN quoting a made-up message (our Message-ID shape, no valid signature anywhere)."""
    victim, control = unique("never-sent"), unique("dsn-control")
    post(stack, control)
    (to_control,) = sent_to(stack, control)
    forged_headers = (
        f"From: news@acme.example\r\nTo: {victim}\r\n"
        "Message-ID: <0193a5c2e1f04b7d9a8c6e5f4d3c2b1a.0@acme.example>\r\n"
        f"List-Unsubscribe: <{stack.url}/v1/unsubscribe/{'A' * 60}>\r\n"
    ).encode()
    report = dsn(forged_headers, victim, f"bounces@{BOUNCE_DOMAIN}")
    answer = await deliver(stack, report, f"bounces@{BOUNCE_DOMAIN}")
    assert answer.startswith("250")
    unmatched = wait_until(lambda: of_type(events, victim, "unmatched"))
    assert unmatched[0].tenant == "" and unmatched[0].message_id == answer.split()[3]
    assert unmatched[0].category == "bad-mailbox" and unmatched[0].smtp.enhanced == "5.1.1"
    assert "0193a5c2e1f04b7d9a8c6e5f4d3c2b1a" in (unmatched[0].detail or "")
    await deliver(stack, bounce_for(to_control, control), to_control.mail_from)
    wait_until(lambda: suppression_of(stack, control))
    assert suppression_of(stack, victim) is None
    assert not [r for r in suppressions.records() if victim.encode() in (r.key() or b"")]


async def test_a_report_nobody_can_read_is_kept_for_an_operator(
    stack: Stack, events: EventLog, rejected: TopicTail
) -> None:
    raw = (
        b"From: someone@elsewhere.example\r\nTo: fbl@" + BOUNCE_DOMAIN.encode() + b"\r\n"
        b"Subject: hello there\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n"
        b"--x\r\nContent-Type: text/plain\r\n\r\nnot a report \xff\xfe\r\n"
    )
    answer = await deliver(stack, raw, f"fbl@{BOUNCE_DOMAIN}", "someone@elsewhere.example")
    report_id = answer.split()[3]
    assert report_id.startswith("rpt-")
    kept: list[Message] = rejected.wait_for(
        lambda rs: any(r.key() == report_id.encode() for r in rs), timeout_s=30
    )
    record = next(r for r in kept if r.key() == report_id.encode())
    assert record.value() == raw, "the raw message, byte for byte"
    headers = dict(record.headers() or [])
    assert headers["mailrail-error-code"] == b"unparsed-report"
    assert headers["mailrail-smtp-mail-from"] == b"someone@elsewhere.example"
    events.wait_for(
        lambda _: any(
            e.message_id == report_id and e.type.value == "unparsed" for e in events.events()
        )
    )


# --- complaints ---------------------------------------------------------------------------


async def test_a_complaint_to_the_feedback_address_suppresses(
    stack: Stack, events: EventLog
) -> None:
    address = unique("fbl")
    first = post(stack, address)
    (original,) = sent_to(stack, address)
    assert (await deliver(stack, arf(original, address), f"fbl@{BOUNCE_DOMAIN}")).startswith("250")
    complained = [
        e for e in events.wait_types(address, {"complained"}) if e.type.value == "complained"
    ]
    assert complained[0].message_id == first["id"] and complained[0].category == "complaint"
    entry = wait_until(lambda: suppression_of(stack, address))
    assert entry["reason"] == "complaint"
    second = post(stack, address, "again")
    assert second["recipients"] == [{"email": address, "status": "suppressed"}]


# --- soft bounces ---------------------------------------------------------------------------


async def test_three_soft_bounces_suppress(stack: Stack, events: EventLog) -> None:
    address = unique("soft")
    full = "smtp; 452 4.2.2 <{rcpt}>: Mailbox over quota"
    for n in range(3):
        assert suppression_of(stack, address) is None, f"suppressed after {n} soft bounces"
        post(stack, address, f"try {n}")
        original = sent_to(stack, address, n + 1)[n]
        report = bounce_for(original, address, status="4.2.2", diagnostic=full)
        assert (await deliver(stack, report, original.mail_from)).startswith("250")
        seen = n + 1

        def counted(seen: int = seen) -> bool:
            return len(of_type(events, address, "bounced")) == seen

        wait_until(counted)
    soft = of_type(events, address, "bounced")
    assert all(e.hard is False and e.category == "quota" for e in soft)
    entry = wait_until(lambda: suppression_of(stack, address))
    assert entry["reason"].startswith("soft-bounce-limit: 3 soft bounces within 7 days")
    assert post(stack, address, "after")["recipients"][0]["status"] == "suppressed"


def _key(address: str) -> bytes:
    return suppression_key("acme", address).encode()
