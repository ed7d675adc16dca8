from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.policy import default

import pytest

from schemas.api import Attachment, Content
from schemas.records import BatchRecipient, DeliveryBatch
from services.sender.compose import compose, substitute
from services.sender.retry import expired, next_delay, tier_for
from services.sender.smtp import reply_of


def batch(content: Content) -> DeliveryBatch:
    return DeliveryBatch(
        message_id="abc",
        tenant="acme",
        pool="default",
        throttle_key="x.example",
        domain="x.example",
        from_="Shop <shop@acme.example>",
        content=content,
        recipients=[BatchRecipient(email="u@x.example", index=3, vars={"name": "<Ann>"})],
        accepted_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def test_substitution_fills_known_and_blanks_unknown_variables() -> None:
    assert substitute("Hi {{ name }}{{missing}}!", {"name": "Ann"}) == "Hi Ann!"
    assert substitute("<b>{{name}}</b>", {"name": "<x>"}, escape=True) == "<b>&lt;x&gt;</b>"


def test_compose_structured_message() -> None:
    content = Content(
        subject="Hello {{name}}",
        text="Hi {{name}}\nbye",
        html="<p>{{name}}</p>",
        headers={"X-Campaign": "c1"},
        attachments=[Attachment(filename="a.txt", content_type="text/plain", content="aGk=")],
    )
    b = batch(content)
    data = compose(b, b.recipients[0])
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    parsed = message_from_bytes(data, policy=default)
    assert parsed["Subject"] == "Hello <Ann>"
    assert parsed["To"] == "u@x.example"
    assert parsed["Message-ID"] == "<abc.3@acme.example>"
    assert parsed["X-Campaign"] == "c1"
    assert "&lt;Ann&gt;" in parsed.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert [p.get_filename() for p in parsed.iter_attachments()] == ["a.txt"]


def test_compose_raw_message_normalises_line_ends() -> None:
    import base64

    raw = base64.b64encode(b"Subject: x\n\nline\r\nlone\rcr\n").decode()
    b = batch(Content(raw=raw))
    assert compose(b, b.recipients[0]) == b"Subject: x\r\n\r\nline\r\nlone\r\ncr\r\n"


@pytest.mark.parametrize(
    ("code", "message", "enhanced", "text"),
    [
        (550, "5.1.1 No such user", "5.1.1", "No such user"),
        (451, "Try   again\nlater", None, "Try again later"),
        (550, "4.1.1 mismatched class", None, "mismatched class"),
    ],
)
def test_reply_parsing(code: int, message: str, enhanced: str | None, text: str) -> None:
    reply = reply_of(code, message)
    assert (reply.code, reply.enhanced, reply.text) == (code, enhanced, text)


def test_retry_schedule_and_tiers() -> None:
    assert next_delay(1, [60, 600], jitter=0) == timedelta(seconds=60)
    assert next_delay(5, [60, 600], jitter=0) == timedelta(seconds=600)
    assert tier_for(timedelta(seconds=5)) == "1m"
    assert tier_for(timedelta(minutes=30)) == "10m"
    assert tier_for(timedelta(hours=7)) == "6h"
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert not expired(start, start + timedelta(days=1), timedelta(hours=1), timedelta(days=3))
    assert expired(start, start + timedelta(days=3), timedelta(hours=1), timedelta(days=3))


def test_composer_copies_match_full_composition() -> None:
    import re

    from services.sender.compose import Composer

    content = Content(subject="Hello", text="Hi\n.\nthere", html="<p>x</p>")
    b = batch(content).model_copy(
        update={"recipients": [BatchRecipient(email=f"u{i}@x.example", index=i) for i in range(3)]}
    )
    composer = Composer(b)
    for recipient in b.recipients:
        fast = composer.render(recipient)
        full = compose(b, recipient)

        def strip(data: bytes) -> bytes:
            data = re.sub(rb"Date: [^\r]*\r\n", b"", data)
            return re.sub(rb"=+\d+==", b"BOUNDARY", data)

        assert strip(fast) == strip(full)
        assert f"To: {recipient.email}\r\n".encode() in fast
        assert f"<abc.{recipient.index}@acme.example>".encode() in fast
    personal = batch(Content(subject="Hi {{name}}", text="t"))
    assert Composer(personal).render(personal.recipients[0]).startswith(b"From:")
