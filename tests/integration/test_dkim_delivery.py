"""Mail through the whole stack (HTTP → Kafka → sender → loopback SMTP) arrives DKIM-signed,
and every signature of every message verifies with dkimpy against the stack's DNS server."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from tests.integration.conftest import Stack, unique
from tests.support.dkim_keys import dkim_dnsfunc, verify_all
from tests.support.kafka import EventLog

SIGNED_FROM = "Signed Shop <shop@signed.example>"
ALIGNED = "aligned: signed.example/s1, signed.example/s2, mailrail.test/p1"
PDF = base64.b64encode(bytes(range(256)) * 64).decode()
RAW = (
    b"From: =?utf-8?q?Sign=C3=A9d?= <shop@signed.example>\nTo: undisclosed-recipients:;\n"
    b"Subject:   raw\t\tmessage  \n  with a folded subject\nMIME-Version: 1.0\n"
    b'Content-Type: multipart/mixed; boundary="b1"\n\n--b1\nContent-Type: text/plain\n\n'
    + b"long " * 190
    + b"\ntrailing spaces   \n--b1--\n\n\n"
)

BODIES: dict[str, dict[str, Any]] = {
    "non-ascii subject and body": {
        "subject": "Grüße, {{name}} — 你好 ✓",
        "text": "Hallo {{name}},\nÜnïcödé ✓\n.\nEnde",
        "html": "<p>Grüße {{name}}</p>",
    },
    "long lines": {
        "subject": "Long " + "x" * 300,
        "text": "a" * 6000 + "\n" + " ".join(f"w{i}" for i in range(1500)),
        "html": "<p>" + "b" * 4000 + "</p>",
    },
    "attachments": {
        "subject": "Invoice {{name}}",
        "text": "attached",
        "attachments": [
            {"filename": "invoice.pdf", "content_type": "application/pdf", "content": PDF},
            {"filename": "nötes.txt", "content_type": "text/plain", "content": "aGkK"},
        ],
    },
    "raw": {"raw": base64.b64encode(RAW).decode()},
}


def post(stack: Stack, body: dict[str, Any]) -> str:
    with stack.client() as client:
        answer = client.post("/v1/messages", json=body)
    assert answer.status_code == 202, answer.text
    message_id: str = answer.json()["id"]
    return message_id


@pytest.mark.parametrize("kind", list(BODIES))
def test_every_message_arrives_with_signatures_that_verify(
    kind: str, stack: Stack, events: EventLog
) -> None:
    addresses = [unique("dk1"), unique("dk2"), unique("dk3")]
    to = [addresses[0], {"email": addresses[1], "vars": {"name": "Zoë"}}, addresses[2]]
    post(stack, {"from": SIGNED_FROM, "to": to, **BODIES[kind]})
    stack.sink.wait_for(
        lambda ms: all(any(a in m.rcpt_tos for m in ms) for a in addresses), timeout_s=30
    )
    dnsfunc = dkim_dnsfunc(stack.dns.address)
    for address in addresses:
        [message] = stack.sink.messages_for(address)
        assert verify_all(message.data, dnsfunc) == [True, True, True], (address, kind)
        delivered = [e for e in events.wait_types(address, {"delivered"}) if e.type == "delivered"]
        assert delivered[0].dkim == ALIGNED


def test_domain_without_key_gets_the_platform_signature_and_the_event_says_so(
    stack: Stack, events: EventLog
) -> None:
    rcpt = unique("dk-unaligned")
    post(stack, {"from": "shop@acme.example", "to": [rcpt], "subject": "s", "text": "t"})
    stack.sink.wait_for(lambda ms: any(rcpt in m.rcpt_tos for m in ms), timeout_s=30)
    [message] = stack.sink.messages_for(rcpt)
    assert verify_all(message.data, dkim_dnsfunc(stack.dns.address)) == [True]
    [delivered] = [e for e in events.wait_types(rcpt, {"delivered"}) if e.type == "delivered"]
    assert delivered.dkim == "unaligned: mailrail.test/p1 (no key for acme.example)"
