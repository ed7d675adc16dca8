import itertools
import re
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.policy import default
from pathlib import Path

import dkim
import pytest

from schemas.api import Attachment, Content
from schemas.catalogue import tier_for
from schemas.records import BatchRecipient, DeliveryBatch
from schemas.rules import Pool, Rules
from services.bounce.verp import VerpToken, decode_message_id
from services.runtime.controls import Controls
from services.sender.compose import LOCAL_IDS, Composer, MessageIds, compose, substitute
from services.sender.deliver import Deliverer, DeliveryPolicy
from services.sender.dkim import DkimSigner
from services.sender.dkim_keys import load_keyring
from services.sender.retry import expired, next_delay
from services.sender.settings import SenderSettings
from services.sender.smtp import SmtpOptions, SmtpPool, reply_of
from tests.support.dkim_keys import dkim_records, verify_all, write_key_folder
from tests.support.smtp_server import SmtpServerFactory


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
    assert parsed["Message-ID"].endswith("@acme.example>")
    assert decode_message_id(parsed["Message-ID"], LOCAL_IDS.key) == VerpToken("abc", 3, "acme")
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


def test_retries_are_spread_by_ten_percent_jitter_around_the_schedule() -> None:
    delays = [next_delay(2, [60, 600]).total_seconds() for _ in range(2000)]
    assert min(delays) >= 540 and max(delays) <= 660
    # Spread over the whole band, so deferred mail of one moment does not retry in lockstep.
    assert min(delays) < 560 and max(delays) > 640 and len({round(d) for d in delays}) > 50


def test_the_default_schedule_backs_off_from_a_minute_to_hours() -> None:
    schedule = SenderSettings(pool="default").retry_schedule_s
    assert schedule[0] == 60 and schedule[-1] >= 4 * 3600
    assert all(b >= a * 2 for a, b in itertools.pairwise(schedule))


def test_retry_schedule_and_tiers() -> None:
    assert next_delay(1, [60, 600], jitter=0) == timedelta(seconds=60)
    assert next_delay(5, [60, 600], jitter=0) == timedelta(seconds=600)
    assert tier_for(timedelta(seconds=5)) == "10s"
    assert tier_for(timedelta(seconds=59)) == "10s"
    assert tier_for(timedelta(seconds=61)) == "1m"
    assert tier_for(timedelta(minutes=30)) == "10m"
    assert tier_for(timedelta(hours=7)) == "6h"
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert not expired(start, start + timedelta(days=1), timedelta(hours=1), timedelta(days=3))
    assert expired(start, start + timedelta(days=3), timedelta(hours=1), timedelta(days=3))


def test_composer_copies_match_full_composition() -> None:
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
        parsed = message_from_bytes(fast, policy=default)
        token = decode_message_id(parsed["Message-ID"], LOCAL_IDS.key)
        assert token == VerpToken("abc", recipient.index, "acme")
    personal = batch(Content(subject="Hi {{name}}", text="t"))
    assert Composer(personal).render(personal.recipients[0]).startswith(b"From:")


# --- signed Message-IDs ---------------------------------------------------------------------

IDS = MessageIds(b"unit-test-verp-key-0001", "bounces.mailrail.example")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
#: The Message-ID header as the sender writes it: one line, one RFC 5322 msg-id.
MESSAGE_ID_LINE = re.compile(
    rf"\r\nMessage-ID: (<{_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*>)\r\n".encode()
)


def message_id_of(data: bytes) -> str:
    (value,) = MESSAGE_ID_LINE.findall(data.split(b"\r\n\r\n", 1)[0] + b"\r\n")
    assert message_from_bytes(data, policy=default)["Message-ID"] == value.decode()
    return str(value.decode())


def many(content: Content, *indexes: int, **update: object) -> DeliveryBatch:
    recipients = [BatchRecipient(email=f"u{i}@x.example", index=i) for i in indexes]
    return batch(content).model_copy(update={"recipients": recipients, **update})


def test_message_ids_are_signed_with_the_key_given() -> None:
    b = many(Content(subject="Hello", text="Hi"), 0, 7)
    composer = Composer(b, links=None, ids=IDS)
    for recipient in b.recipients:
        for data in (composer.render(recipient), compose(b, recipient, links=None, ids=IDS)):
            value = message_id_of(data)
            assert decode_message_id(value, IDS.key) == VerpToken("abc", recipient.index, "acme")
            assert decode_message_id(value, LOCAL_IDS.key) is None


@pytest.mark.parametrize("tenant", ["a", "acme", "t" * 19, "a-tenant-with-a-32-character-nam"])
def test_the_fast_path_writes_what_full_composition_writes_at_every_length(tenant: str) -> None:
    """The email package folds a msg-id by its length (onto a line of its own, or not at all);
    both paths write it on the header's own line, whatever the tenant, id and index."""
    indexes = (0, 127, 128, 2**14, 2**21, 2**32 - 1)
    for message_id in ("m", "x" * 32, "0193a5c2e1f04b7d9a8c6e5f4d3c2b1a"):
        b = many(Content(subject="Hello", text="Hi"), *indexes, tenant=tenant)
        b = b.model_copy(update={"message_id": message_id})
        composer = Composer(b, links=None, ids=IDS)
        assert composer._template is not None, "the fast path is taken"
        seen = set()
        for recipient in b.recipients:
            fast = composer.render(recipient)
            assert _stable(fast) == _stable(compose(b, recipient, links=None, ids=IDS))
            value = message_id_of(fast)
            assert decode_message_id(value, IDS.key) == VerpToken(
                message_id, recipient.index, tenant
            )
            seen.add(value)
        assert len(seen) == len(indexes), "one Message-ID per recipient copy"


def _stable(data: bytes) -> bytes:
    data = re.sub(rb"Date: [^\r]*\r\n", b"", data)
    return re.sub(rb"=+\d+==", b"BOUNDARY", data)


def test_the_stand_in_written_by_a_tenant_stays_theirs() -> None:
    stand_in = "Message-ID: <mailrail-message-id-placeholder@invalid>"
    b = many(Content(subject=stand_in, text=f"{stand_in}\n{stand_in}\n"), 0, 1)
    composer = Composer(b, links=None, ids=IDS)
    for recipient in b.recipients:
        for data in (composer.render(recipient), compose(b, recipient, links=None, ids=IDS)):
            value = message_id_of(data)
            assert decode_message_id(value, IDS.key) == VerpToken("abc", recipient.index, "acme")
            parsed = message_from_bytes(data, policy=default)
            assert parsed["Subject"] == stand_in
            assert parsed.get_content().count(stand_in) == 2


@pytest.mark.parametrize(
    ("sender", "right"),
    [
        ("Shop <shop@Bücher.example>", "xn--bcher-kva.example"),
        ("Shöp <shöp@straße.example>", "xn--strae-oqa.example"),
        ("Shop <shop@[192.0.2.1]>", "bounces.mailrail.example"),
    ],
)
def test_the_right_hand_side_is_the_from_domain_in_ascii(sender: str, right: str) -> None:
    b = many(Content(subject="Hello", text="Hi"), 0, 1).model_copy(update={"from_": sender})
    composer = Composer(b, links=None, ids=IDS)
    for recipient in b.recipients:
        data = composer.render(recipient)
        value = message_id_of(data)
        assert value.endswith(f"@{right}>") and value.isascii()
        assert decode_message_id(value, IDS.key) == VerpToken("abc", recipient.index, "acme")


def test_a_shared_copy_names_its_first_recipient() -> None:
    b = many(Content(subject="Hello", text="Hi"), 4, 5, 6)
    data = compose(b, b.recipients[0], shared=True, links=None, ids=IDS)
    assert message_from_bytes(data, policy=default)["To"] == "undisclosed-recipients:;"
    assert decode_message_id(message_id_of(data), IDS.key) == VerpToken("abc", 4, "acme")


def test_a_raw_message_keeps_its_own_message_id() -> None:
    import base64

    raw = b"Message-ID: <own@tenant.example>\r\nSubject: x\r\n\r\nbody\r\n"
    b = batch(Content(raw=base64.b64encode(raw).decode()))
    assert compose(b, b.recipients[0], links=None, ids=IDS) == raw


@pytest.mark.parametrize("verp", [True, False])
async def test_the_deliverer_signs_each_message_id_with_its_verp_key(
    verp: bool, smtp_server_factory: SmtpServerFactory
) -> None:
    """Per-recipient transactions (VERP) and one shared transaction (`verp: false`)."""
    sink = smtp_server_factory()
    key = b"deliverer-verp-key-0001"
    policy = DeliveryPolicy(
        bounce_domain="bounces.mailrail.example",
        verp_key=key,
        retry_schedule_s=[60.0],
        max_age=timedelta(days=1),
        smart_host=(sink.host, sink.port),
    )
    smtp = SmtpPool(SmtpOptions(ehlo="sender.mailrail.example"))
    deliverer = Deliverer(Pool(name="default", verp=verp), Rules(), policy, smtp, None, Controls())
    b = many(Content(subject="Hello", text="Hi"), 3, 9)
    try:
        await deliverer.deliver(b)
    finally:
        await smtp.close()
    arrived = {r.email: sink.messages_for(r.email) for r in b.recipients}
    tokens = {
        e: [decode_message_id(message_id_of(m.data), key) for m in ms] for e, ms in arrived.items()
    }
    if verp:
        assert tokens == {
            "u3@x.example": [VerpToken("abc", 3, "acme")],
            "u9@x.example": [VerpToken("abc", 9, "acme")],
        }
    else:
        assert len(sink.messages) == 1, "one transaction for both"
        assert tokens == {e: [VerpToken("abc", 3, "acme")] for e in arrived}


def test_the_longest_message_id_is_dkim_signed_and_verifies(tmp_path: Path) -> None:
    folder = write_key_folder(
        tmp_path, {"mailrail.test": ["p1.ed25519"]}, {"platform_domains": ["mailrail.test"]}
    )
    records = {name: r["TXT"][0] for name, r in dkim_records(folder).items()}

    def dnsfunc(name: bytes, timeout: int = 5, **_: object) -> bytes:
        return str(records.get(name.decode().rstrip("."), "")).encode()

    tenant = "a-tenant-with-a-32-character-nam"
    b = many(Content(subject="Hello", text="Hi"), 2**32 - 1, tenant=tenant, message_id="x" * 32)
    b = b.model_copy(update={"from_": "Shop <shop@bücher.example>"})
    data = compose(b, b.recipients[0], links=None, ids=IDS)
    assert len(message_id_of(data)) > 78 - len("Message-ID: ")
    signed = DkimSigner(load_keyring(folder), frozenset()).sign(data, tenant)
    assert signed.summary.startswith("unaligned: mailrail.test/p1")
    assert verify_all(signed.data, dnsfunc) == [True]
    signature = dkim.DKIM(signed.data)
    signature.verify_headerprep(0)
    assert b"message-id" in signature.include_headers
