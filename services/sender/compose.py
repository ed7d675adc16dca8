"""Turn a batch's content into the bytes one recipient receives.

Per-recipient `{{name}}` variables are substituted here, so a batch carries one body for many
recipients. The Message-ID is signed like the VERP return path (`encode_message_id` in
`services/bounce/verp.py`: message id, recipient index and tenant, with the VERP key), so a
report that quotes only the original headers still names message and tenant, and nobody can
make one up. A copy shared by many recipients names its first recipient in it.

Every recipient's copy starts with `List-Unsubscribe` (a signed one-click URL on ingest, and
optionally a mailto) and `List-Unsubscribe-Post` (RFC 8058), when `MAILRAIL_PUBLIC_URL` is
set. A raw message that already has its own List-Unsubscribe keeps it and gets none of ours.
One copy shared by many recipients (`shared=True`) gets none: a one-click link is per address.
"""

import base64
import html
import re
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import format_datetime
from typing import Literal

from schemas.addresses import address_of, domain_of
from schemas.records import BatchRecipient, DeliveryBatch, utc_now
from services.bounce.oneclick import OneClickLinks, default_links
from services.bounce.verp import encode_message_id

_VARIABLE = re.compile(r"\{\{\s*([A-Za-z0-9_.-]+)\s*\}\}")
_BARE_LINE_END = re.compile(rb"\r\n|\r|\n")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LIST_UNSUBSCRIBE = re.compile(rb"^list-unsubscribe:", re.IGNORECASE | re.MULTILINE)
#: What a header may not carry once its RFC 2047 encoded words are decoded.
_HEADER_BREAK = re.compile(r"[\r\n\x00]")
#: Links from this process's environment (`MAILRAIL_PUBLIC_URL`, `MAILRAIL_UNSUBSCRIBE_*`).
FROM_ENVIRONMENT: Literal["environment"] = "environment"
Links = OneClickLinks | None | Literal["environment"]


def substitute(template: str, values: dict[str, str], escape: bool = False) -> str:
    def replace(match: re.Match[str]) -> str:
        value = values.get(match.group(1), "")
        return html.escape(value) if escape else value

    return _VARIABLE.sub(replace, template)


@dataclass(frozen=True)
class MessageIds:
    """What signs each copy's Message-ID: the VERP key (`MAILRAIL_VERP_KEY`, which the bounce
    service verifies with), and the bounce domain, the right-hand side for a From domain that
    has no ASCII form."""

    key: bytes
    bounce_domain: str


#: What a sender with the default settings and rules uses; the sender passes its own.
LOCAL_IDS = MessageIds(b"mailrail-local-verp-key", "bounces.mailrail.localhost")


def message_id_for(
    batch: DeliveryBatch, recipient: BatchRecipient, ids: MessageIds = LOCAL_IDS
) -> str:
    """`<b-<token>-<tenant>@<From domain>>`, unique to this recipient's copy of the message."""
    domain = domain_of(address_of(batch.from_))
    return encode_message_id(
        batch.message_id, recipient.index, batch.tenant, domain, ids.bounce_domain, ids.key
    )


UNDISCLOSED = "undisclosed-recipients:;"


def personalised(batch: DeliveryBatch) -> bool:
    """True when recipients' bytes differ (variables), so each needs its own transaction."""
    content = batch.content
    parts = (content.subject, content.text, content.html)
    return any(r.vars for r in batch.recipients) or any("{{" in (p or "") for p in parts)


def unsubscribe_lines(
    batch: DeliveryBatch,
    recipient: BatchRecipient,
    links: Links = FROM_ENVIRONMENT,
    extra_headers: dict[str, str] | None = None,
) -> bytes:
    """The recipient's List-Unsubscribe and List-Unsubscribe-Post lines, or nothing."""
    resolved = default_links() if links == FROM_ENVIRONMENT else links
    if not isinstance(resolved, OneClickLinks):
        return b""
    if any(name.lower() == "list-unsubscribe" for name in extra_headers or {}):
        return b""
    return resolved.headers(batch.tenant, batch.message_id, recipient.email)


def compose(
    batch: DeliveryBatch,
    recipient: BatchRecipient,
    extra_headers: dict[str, str] | None = None,
    shared: bool = False,
    links: Links = FROM_ENVIRONMENT,
    ids: MessageIds = LOCAL_IDS,
) -> bytes:
    """The message as it goes on the wire: CRLF line ends, every line a full line.

    `shared`: one copy for every recipient of the batch (To: undisclosed recipients).
    `links`: how to make the one-click unsubscribe link (None: no List-Unsubscribe).
    `ids`: how to sign the Message-ID (a raw message keeps its own).
    """
    content = batch.content
    own = b"" if shared else unsubscribe_lines(batch, recipient, links, extra_headers)
    raw = content.raw_bytes()
    if raw is not None:
        head = "".join(f"{k}: {v}\r\n" for k, v in (extra_headers or {}).items()).encode()
        end = _HEADER_END.search(raw)
        if own and _LIST_UNSUBSCRIBE.search(raw[: end.start() if end else len(raw)]):
            own = b""
        return head + own + _crlf(raw)
    data = _structured(batch, recipient, extra_headers, shared)
    return own + _with_message_id(data, message_id_for(batch, recipient, ids))


def _structured(
    batch: DeliveryBatch,
    recipient: BatchRecipient,
    extra_headers: dict[str, str] | None,
    shared: bool,
) -> bytes:
    """The structured message with the Message-ID stand-in (`_ID_LINE`, exactly once in the
    header; the email package would fold a long msg-id one way or another by its length)."""
    content = batch.content
    message = EmailMessage()
    _set_header(message, "From", batch.from_, address_of(batch.from_))
    message["To"] = UNDISCLOSED if shared else recipient.email
    message["Subject"] = substitute(content.subject or "", recipient.vars)
    message["Date"] = format_datetime(utc_now())
    message["Message-ID"] = _ID_STAND_IN
    message["MIME-Version"] = "1.0"
    if content.reply_to:
        _set_header(message, "Reply-To", content.reply_to, address_of(content.reply_to))
    for name, value in (content.headers | (extra_headers or {})).items():
        _set_header(message, name, value)
    if content.text is not None:
        message.set_content(substitute(content.text, recipient.vars), cte="quoted-printable")
    if content.html is not None:
        body = substitute(content.html, recipient.vars, escape=True)
        if content.text is not None:
            message.add_alternative(body, subtype="html", cte="quoted-printable")
        else:
            message.set_content(body, subtype="html", cte="quoted-printable")
    for attachment in content.attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        message.add_attachment(
            base64.b64decode(attachment.content),
            maintype=maintype,
            subtype=subtype,
            filename=attachment.filename,
        )
    for name, value in message.items():
        if _HEADER_BREAK.search(str(value)):
            # An encoded word that decodes to CR or LF (=?utf-8?q?x=0D=0ABcc:...?=) would be
            # written out as a header line of its own (Python < 3.11.10 does not refuse it).
            message.replace_header(name, " ".join(_HEADER_BREAK.sub(" ", str(value)).split()))
    policy = SMTPUTF8 if not recipient.email.isascii() or not batch.from_.isascii() else SMTP
    return message.as_bytes(policy=policy)


def _with_message_id(data: bytes, message_id: str) -> bytes:
    """`data` with the Message-ID stand-in replaced: the header comes before the body, and no
    earlier header can hold a line of its own, so the first `_ID_LINE` is the header."""
    return data.replace(_ID_LINE, b"\r\nMessage-ID: " + message_id.encode() + b"\r\n", 1)


def _set_header(message: EmailMessage, name: str, value: str, fallback: str | None = None) -> None:
    """Set a header; an address header whose encoded words decode to CR or LF cannot be
    written (the email package raises ValueError): it gets `fallback`, or is left out."""
    try:
        message[name] = value
    except ValueError:
        if fallback is not None:
            message[name] = fallback


def _crlf(data: bytes) -> bytes:
    data = _BARE_LINE_END.sub(b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


_TO_STAND_IN = "mailrail-recipient-placeholder@invalid"
_ID_STAND_IN = "<mailrail-message-id-placeholder@invalid>"
_ID_LINE = f"\r\nMessage-ID: {_ID_STAND_IN}\r\n".encode()


class Composer:
    """Composes one batch for each of its recipients, building the MIME tree only once.

    When recipients' bytes differ only in To and Message-ID (no variables, ASCII addresses),
    the message is serialised once with placeholders and each copy is a byte substitution;
    otherwise each recipient's message is built in full.
    """

    def __init__(
        self, batch: DeliveryBatch, links: Links = FROM_ENVIRONMENT, ids: MessageIds = LOCAL_IDS
    ) -> None:
        self._batch = batch
        self._links = default_links() if links == FROM_ENVIRONMENT else links
        self._ids = ids
        self._template: bytes | None = None
        simple = (
            batch.content.raw is None
            and not personalised(batch)
            and batch.from_.isascii()
            and all(r.email.isascii() for r in batch.recipients)
        )
        if simple:
            stand_in = BatchRecipient(email=_TO_STAND_IN, index=0)
            template = _structured(batch, stand_in, None, shared=False)
            if template.count(_TO_STAND_IN.encode()) == 1:
                self._template = template

    def render(
        self, recipient: BatchRecipient, extra_headers: dict[str, str] | None = None
    ) -> bytes:
        if self._template is None:
            return compose(self._batch, recipient, extra_headers, links=self._links, ids=self._ids)
        data = self._template.replace(_TO_STAND_IN.encode(), recipient.email.encode(), 1)
        data = _with_message_id(data, message_id_for(self._batch, recipient, self._ids))
        data = unsubscribe_lines(self._batch, recipient, self._links, extra_headers) + data
        if extra_headers:
            head = "".join(f"{name}: {value}\r\n" for name, value in extra_headers.items())
            data = head.encode() + data
        return data
