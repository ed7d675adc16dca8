"""One-click unsubscribe: the tokens, and the List-Unsubscribe headers every copy carries."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime
from email import message_from_bytes
from email.policy import default
from urllib.parse import unquote

import pytest

from schemas.api import Content
from schemas.records import BatchRecipient, DeliveryBatch
from services.bounce.oneclick import (
    ONE_CLICK,
    OneClickLinks,
    Unsubscribe,
    decode_token,
    encode_token,
    token_in_header,
    token_in_subject,
)
from services.sender.compose import Composer, compose

KEY = b"unit-test-unsubscribe-key-0001"
LINKS = OneClickLinks("https://mail.example.net", KEY, "unsubscribe@bounces.example.net")


def batch(content: Content, recipients: int = 2) -> DeliveryBatch:
    return DeliveryBatch(
        message_id="0193a5c2e1f04b7d9a8c6e5f4d3c2b1a",
        tenant="acme",
        pool="default",
        throttle_key="x.example",
        domain="x.example",
        from_="Shop <shop@acme.example>",
        content=content,
        recipients=[
            BatchRecipient(email=f"reader{i}@x.example", index=i) for i in range(recipients)
        ],
        accepted_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def test_a_token_says_who_was_sent_what() -> None:
    token = encode_token("acme", "0193a5c2", "Zoë.Ünïcode@bücher.example", KEY)
    assert decode_token(token, KEY) == Unsubscribe("acme", "0193a5c2", "Zoë.Ünïcode@bücher.example")
    assert token.replace("-", "").replace("_", "").isalnum(), "URL-safe as it is"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # tag changed
        lambda t: t[:10] + ("x" if t[10] != "x" else "y") + t[11:],  # payload changed
        lambda t: t[:30],  # cut short
        lambda t: t + "==",  # not the alphabet
        lambda t: "",
    ],
)
def test_a_changed_token_is_refused(mangle: object) -> None:
    token = encode_token("acme", "0193a5c2", "bob@example.org", KEY)
    assert decode_token(mangle(token), KEY) is None  # type: ignore[operator]


def test_a_token_from_another_key_is_refused() -> None:
    token = encode_token("acme", "m1", "bob@example.org", b"another-key-of-enough-bytes")
    assert decode_token(token, KEY) is None
    forged = base64.urlsafe_b64encode(b"\x01\x04acme\x02m1bob@example.org" + bytes(16))
    assert decode_token(forged.decode().rstrip("="), KEY) is None


def test_tokens_are_found_where_they_travel() -> None:
    token = encode_token("acme", "m1", "bob@example.org", KEY)
    header = f"<https://x.example/v1/unsubscribe/{token}>,\r\n <mailto:u@x?subject=unsubscribe%20{token}>"
    assert token_in_header(header) == token
    assert token_in_subject(f"Re: unsubscribe {token}") == token
    assert token_in_header("<https://tenant.example/optout?id=1>") is None


def test_every_recipient_copy_carries_its_own_one_click_link() -> None:
    b = batch(Content(subject="Hello", text="Hi"))
    composer = Composer(b, links=LINKS)
    for recipient in b.recipients:
        data = composer.render(recipient)
        assert _without_date(data) == _without_date(compose(b, recipient, links=LINKS))
        parsed = message_from_bytes(data, policy=default)
        assert parsed["List-Unsubscribe-Post"] == ONE_CLICK
        url, mailto = [u.strip().strip("<>") for u in str(parsed["List-Unsubscribe"]).split(",")]
        assert url.startswith("https://mail.example.net/v1/unsubscribe/")
        said = decode_token(url.rpartition("/")[2], KEY)
        assert said == Unsubscribe("acme", b.message_id, recipient.email)
        assert mailto.startswith("mailto:unsubscribe@bounces.example.net?subject=")
        assert decode_token(unquote(mailto).rpartition(" ")[2], KEY) == said
        assert all(len(line) <= 998 for line in data.split(b"\r\n"))


def _without_date(data: bytes) -> bytes:
    return re.sub(rb"=+\d+==", b"B", re.sub(rb"Date: [^\r]*\r\n", b"", data))


def test_personalised_and_raw_messages_carry_it_too() -> None:
    personal = batch(Content(subject="Hi {{name}}", text="t"))
    data = Composer(personal, links=LINKS).render(personal.recipients[1])
    assert message_from_bytes(data, policy=default)["List-Unsubscribe-Post"] == ONE_CLICK
    raw = base64.b64encode(b"From: a@acme.example\r\nSubject: raw\r\n\r\nbody\r\n").decode()
    data = compose(batch(Content(raw=raw)), personal.recipients[0], links=LINKS)
    parsed = message_from_bytes(data, policy=default)
    assert parsed["Subject"] == "raw" and "/v1/unsubscribe/" in str(parsed["List-Unsubscribe"])


def test_a_raw_message_with_its_own_list_unsubscribe_keeps_only_that() -> None:
    raw = b"List-Unsubscribe: <https://tenant.example/optout>\r\nSubject: own\r\n\r\nbody\r\n"
    b = batch(Content(raw=base64.b64encode(raw).decode()))
    assert compose(b, b.recipients[0], links=LINKS) == raw


def test_no_link_without_a_public_url_or_for_a_shared_copy() -> None:
    b = batch(Content(subject="Hello", text="Hi"))
    assert b"List-Unsubscribe" not in compose(b, b.recipients[0], links=None)
    assert b"List-Unsubscribe" not in Composer(b, links=None).render(b.recipients[0])
    assert b"List-Unsubscribe" not in compose(b, b.recipients[0], shared=True, links=LINKS)
