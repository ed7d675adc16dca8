"""Parse inbound bounce and complaint mail into a :class:`Report`.

Understands RFC 3464 delivery status notifications, RFC 5965 ARF feedback reports, and, best
effort, the human-readable bounces that some MTAs send without a report (Postfix, qmail, Exim,
Exchange, Gmail styles). Input is untrusted: :func:`parse_report` never raises, and anything it
cannot understand comes back as ``kind="unparsed"`` with whatever identifiers were found.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email
import email.header
import html
import logging
import quopri
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from email.message import Message
from email.parser import HeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Literal

from services.bounce.classify import parse_reply

logger = logging.getLogger(__name__)

ReportKind = Literal["dsn", "arf", "plain", "unparsed"]

MAX_ORIGINAL_HEADERS = 100
MAX_VALUE_CHARS = 1000
MAX_TEXT_CHARS = 100_000
MAX_DIAGNOSTIC_CHARS = 500

_DSN_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status"})
_ARF_TYPE = "message/feedback-report"
_ORIGINAL_TYPES = frozenset(
    {
        "message/rfc822",
        "message/global",
        "text/rfc822-headers",
        "message/rfc822-headers",
        "message/global-headers",
    }
)
_STATUS_RE = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_FIELD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
# Starts only where a local part can start, so a long run of letters costs linear time.
_ADDRESS_RE = re.compile(
    r"(?<![A-Za-z0-9.!#$%&'*+/=?^_`{|}~-])[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}"
    r"@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})+"
)
_CODE_WITH_STATUS_RE = re.compile(r"(?<![\w.])([45]\d\d)[ -]#?([45]\.\d{1,3}\.\d{1,3})(?![\w.])")
_QMAIL_STATUS_RE = re.compile(r"\(#([45]\.\d{1,3}\.\d{1,3})\)")
_BARE_STATUS_RE = re.compile(r"(?<![\w.])#?([45]\.\d{1,3}\.\d{1,3})(?![\w.])")
_BARE_CODE_RE = re.compile(
    r"(?:said:|returned|response|reply|error|smtp;)[\s:'\"<(]{0,4}([45]\d\d)\b", re.IGNORECASE
)
_BOUNCE_SUBJECT_RE = re.compile(
    r"undeliver|delivery (status|fail|has failed|notification|incomplete|delayed)|failure notice|"
    r"returned mail|mail delivery|not (been )?delivered|non-?delivery|address not found|"
    r"could not be delivered|delayed mail",
    re.IGNORECASE,
)
_BOUNCE_FROM_RE = re.compile(r"mailer-daemon|postmaster|mail delivery", re.IGNORECASE)
_BOUNCE_BODY_RE = re.compile(
    r"qmail-send program|could not be delivered|delivery has failed|undeliverable|"
    r"permanent (fatal )?error|this is the mail system|wasn't delivered|was not delivered|"
    r"address not found|unable to deliver|delivery to the following recipient",
    re.IGNORECASE,
)
_DELAYED_RE = re.compile(
    r"delayed|still being retried|will (keep|continue) (trying|to try)|not yet been delivered|"
    r"still undelivered|is still trying",
    re.IGNORECASE,
)
_ORIGINAL_MARKER_RE = re.compile(
    r"^[ \t>]*(?:-+[ \t]*(?:original message|(?:returned|undelivered) (?:mail|message))|"
    r"-*[ \t]*(?:below this line is a copy of the message|this is a copy of the message|"
    r"original message headers|original message follows|undelivered message headers|"
    r"headers of the original message))[^\n]*",
    re.IGNORECASE | re.MULTILINE,
)


@dataclass(frozen=True)
class ReportRecipient:
    """One recipient named in a report; addresses without ``rfc822;`` or angle brackets."""

    final_recipient: str | None
    original_recipient: str | None = None
    action: str | None = None  # failed, delayed, delivered, relayed, expanded (lower case)
    status: str | None = None  # RFC 3463 code, e.g. "5.1.1"
    diagnostic_code: int | None = None  # SMTP reply code, e.g. 550
    diagnostic_text: str | None = None  # the reply without its codes
    remote_mta: str | None = None


@dataclass(frozen=True)
class Report:
    """What a bounce or complaint message says. ``original_headers`` keys are lower case."""

    kind: ReportKind
    recipients: list[ReportRecipient] = field(default_factory=list)
    original_message_id: str | None = None  # without angle brackets
    original_envelope_id: str | None = None
    original_headers: dict[str, str] = field(default_factory=dict)
    feedback_type: str | None = None  # ARF: abuse, fraud, virus, other, not-spam, ...
    original_mail_from: str | None = None
    arrival_date: str | None = None
    reporting_mta: str | None = None
    report_message_id: str | None = None  # the report's own Message-ID
    report_subject: str | None = None


def parse_report(data: bytes) -> Report:
    """Parse one inbound report message; never raises."""
    try:
        return _parse(data)
    except Exception:  # untrusted input: a parser bug must not stop the bounce service
        logger.warning("report parser failed; keeping the message as unparsed", exc_info=True)
        return Report(kind="unparsed")


def _parse(data: bytes) -> Report:
    msg = email.message_from_bytes(data, policy=compat32)
    dsn_parts, arf_parts, original_parts = [], [], []
    for part in _walk(msg):
        ctype = part.get_content_type()
        if ctype in _DSN_TYPES:
            dsn_parts.append(part)
        elif ctype == _ARF_TYPE:
            arf_parts.append(part)
        elif ctype in _ORIGINAL_TYPES:
            original_parts.append(part)
    headers = _original_headers(original_parts[0]) if original_parts else {}
    base = Report(
        kind="unparsed",
        original_headers=headers,
        original_message_id=_message_id(headers.get("message-id")),
        report_message_id=_message_id(_header(msg, "message-id")),
        report_subject=_header(msg, "subject"),
    )
    if arf_parts:
        return _arf(arf_parts[0], base)
    for part in dsn_parts:
        dsn = _dsn(part, base)
        if dsn.recipients:
            return dsn
        base = replace(base, original_envelope_id=dsn.original_envelope_id)
    text = _body_text(msg)
    plain = _plain(msg, text, base) if _looks_like_bounce(msg, text) else None
    return plain or base


def _walk(part: Message, depth: int = 0) -> Iterator[Message]:
    """Yield parts without descending into attached messages (the original is not the report)."""
    yield part
    if depth < 10 and part.get_content_maintype() == "multipart" and part.is_multipart():
        for sub in part.get_payload():
            if isinstance(sub, Message):
                yield from _walk(sub, depth + 1)


def _clean(value: object, limit: int = MAX_VALUE_CHARS) -> str:
    text = str(value)
    if any("\udc80" <= ch <= "\udcff" for ch in text):
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if "=?" in text:
        with contextlib.suppress(Exception):  # malformed encoded words stay as they are
            text = str(email.header.make_header(email.header.decode_header(text)))
    return " ".join(text.split())[:limit]


def _header(msg: Message, name: str) -> str | None:
    value = msg.get(name)
    return _clean(value) if value is not None else None


def _message_id(value: str | None) -> str | None:
    if not value:
        return None
    return value.strip().strip("<>").strip() or None


def _original_headers(part: Message) -> dict[str, str]:
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        original = payload[0]
    else:
        original = HeaderParser(policy=compat32).parsestr(_decoded_text(part).lstrip())
    return _headers_dict(original)


def _headers_dict(original: Message) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in original.items():
        key = _clean(name, 100).lower()
        if key and key not in headers and len(headers) < MAX_ORIGINAL_HEADERS:
            headers[key] = _clean(value)
    return headers


def _decoded_text(part: Message) -> str:
    """The text of a leaf part, or of the field blocks the parser split a message/* part into."""
    payload = part.get_payload()
    if isinstance(payload, list):
        chunks = []
        for sub in payload:
            if isinstance(sub, Message):
                fields = "\n".join(f"{_clean(k, 100)}: {_clean(v)}" for k, v in sub.items())
                body = sub.get_payload()
                chunks.append(fields + ("\n" + body if isinstance(body, str) else ""))
        text = "\n\n".join(chunks)[:MAX_TEXT_CHARS]
        cte = str(part.get("content-transfer-encoding", "")).strip().lower()
        if cte == "base64":
            try:
                return base64.b64decode("".join(text.split())).decode("utf-8", "replace")
            except (binascii.Error, ValueError):
                return text
        if cte == "quoted-printable":
            return quopri.decodestring(text.encode("utf-8", "replace")).decode("utf-8", "replace")
        return text
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        return _clean(payload, MAX_TEXT_CHARS) if isinstance(payload, str) else ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return raw[:MAX_TEXT_CHARS].decode(charset, "replace")
    except LookupError:
        return raw[:MAX_TEXT_CHARS].decode("utf-8", "replace")


def _field_blocks(text: str) -> list[dict[str, list[str]]]:
    """Split ``Name: value`` blocks separated by blank lines, unfolding continuation lines."""
    blocks: list[dict[str, list[list[str]]]] = []
    current: dict[str, list[list[str]]] = {}
    last: list[str] | None = None
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
            current, last = {}, None
        elif line[0] in " \t" and last is not None:
            last.append(line.strip())
        else:
            name, sep, value = line.partition(":")
            if sep and _FIELD_NAME_RE.match(name.strip()):
                last = [value.strip()]
                current.setdefault(name.strip().lower(), []).append(last)
            else:
                last = None
    if current:
        blocks.append(current)
    return [{k: [" ".join(v) for v in vs] for k, vs in b.items()} for b in blocks]


def _first(block: dict[str, list[str]], name: str) -> str | None:
    values = block.get(name)
    return _clean(values[0]) if values and values[0].strip() else None


def _typed(value: str | None) -> str | None:
    """Drop an RFC 3464 type prefix ("rfc822;", "dns;") and angle brackets."""
    if value is None:
        return None
    _, sep, rest = value.partition(";")
    return (rest if sep else value).strip().strip("<>").strip() or None


def _host(value: str | None) -> str | None:
    """The host name in a Remote-MTA value, without a trailing comment or dot."""
    return value.split()[0].rstrip(".") or None if value else None


def _status(value: str | None) -> str | None:
    m = _STATUS_RE.search(value or "")
    return f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}" if m else None


def _dsn(part: Message, base: Report) -> Report:
    blocks = _field_blocks(_decoded_text(part))
    per_message = next((b for b in blocks if "final-recipient" not in b), {})
    recipients = []
    for block in blocks:
        final = _typed(_first(block, "final-recipient"))
        original = _typed(_first(block, "original-recipient"))
        if final is None and original is None:
            continue
        diagnostic = _typed(_first(block, "diagnostic-code"))
        reply = parse_reply(diagnostic) if diagnostic else None
        action = _first(block, "action")
        recipients.append(
            ReportRecipient(
                final_recipient=final if final and "@" in final else original or final,
                original_recipient=original,
                action=action.split()[0].lower() if action else None,
                status=_status(_first(block, "status"))
                or _status(reply.enhanced if reply else None),
                diagnostic_code=reply.code if reply else None,
                diagnostic_text=reply.text[:MAX_DIAGNOSTIC_CHARS] if reply else None,
                remote_mta=_host(_typed(_first(block, "remote-mta"))),
            )
        )
    return replace(
        base,
        kind="dsn",
        recipients=recipients,
        original_envelope_id=_first(per_message, "original-envelope-id"),
        arrival_date=_first(per_message, "arrival-date"),
        reporting_mta=_typed(_first(per_message, "reporting-mta")),
    )


def _arf(part: Message, base: Report) -> Report:
    fields: dict[str, list[str]] = {}
    for block in _field_blocks(_decoded_text(part)):
        for name, values in block.items():
            fields.setdefault(name, []).extend(values)
    rcpts = [r for v in fields.get("original-rcpt-to", []) if (r := _typed(_clean(v)))]
    if not rcpts and "to" in base.original_headers:
        to = [a for _, a in getaddresses([base.original_headers["to"]]) if "@" in a]
        rcpts = to if len(to) == 1 else []
    feedback_type = _first(fields, "feedback-type")
    return replace(
        base,
        kind="arf",
        recipients=[ReportRecipient(final_recipient=r) for r in dict.fromkeys(rcpts)],
        feedback_type=feedback_type.lower() if feedback_type else None,
        original_mail_from=_typed(_first(fields, "original-mail-from")),
        arrival_date=_first(fields, "arrival-date") or _first(fields, "received-date"),
        reporting_mta=_typed(_first(fields, "reporting-mta")),
    )


def _body_text(msg: Message) -> str:
    """The first text/plain part (or text/html, tags removed) outside attached messages."""
    html_text = None
    for part in _walk(msg):
        ctype = part.get_content_type()
        if ctype == "text/plain":
            return _decoded_text(part).replace("\r\n", "\n")
        if ctype == "text/html" and html_text is None:
            html_text = _decoded_text(part).replace("\r\n", "\n")
    if html_text is None:
        return ""
    html_text = re.sub(r"(?i)<br\s*/?>|</p>|</h\d>", "\n\n", html_text)
    return html.unescape(re.sub(r"<[^>]{0,2000}>", "", html_text))


def _looks_like_bounce(msg: Message, text: str) -> bool:
    if msg.get("x-failed-recipients") is not None:
        return True
    return bool(
        _BOUNCE_SUBJECT_RE.search(_header(msg, "subject") or "")
        or _BOUNCE_FROM_RE.search(_header(msg, "from") or "")
        or _BOUNCE_BODY_RE.search(text[:5000])
    )


@dataclass(frozen=True)
class _Hit:
    code: int | None
    status: str | None
    text: str


def _plain(msg: Message, text: str, base: Report) -> Report | None:
    marker = _ORIGINAL_MARKER_RE.search(text)
    body, tail = (text[: marker.start()], text[marker.end() :]) if marker else (text, "")
    own = {
        addr.lower()
        for name in ("from", "to", "sender", "return-path", "reply-to", "delivered-to")
        for addr in _ADDRESS_RE.findall(_header(msg, name) or "")
    }
    failed = _ADDRESS_RE.findall(_header(msg, "x-failed-recipients") or "")
    found = _plain_recipients(body, failed, own)
    if not found:
        return None
    permanent = any(
        (h.code or 0) >= 500 or (h.status or "").startswith("5") for h in found.values()
    )
    delayed = _DELAYED_RE.search((_header(msg, "subject") or "") + " " + body[:2000])
    action = "delayed" if delayed and not permanent else "failed"
    if not base.original_headers and tail.strip():
        headers = _headers_dict(HeaderParser(policy=compat32).parsestr(tail.lstrip()))
        base = replace(
            base,
            original_headers=headers,
            original_message_id=_message_id(headers.get("message-id")),
        )
    recipients = [
        ReportRecipient(addr, None, action, hit.status, hit.code, hit.text or None)
        for addr, hit in found.items()
    ]
    return replace(base, kind="plain", recipients=recipients)


def _plain_recipients(body: str, failed: list[str], own: set[str]) -> dict[str, _Hit]:
    """Find recipient addresses and, for each, the first SMTP reply in the text about it.

    The text about an address runs from each mention to the next mention of another address.
    Without X-Failed-Recipients, only addresses with a reply code count, unless the text
    names a single address.
    """
    wanted = {a.lower() for a in failed}
    mentions = [
        m
        for m in _ADDRESS_RE.finditer(body)
        if (addr := m.group(0).lower()) not in own
        and not addr.startswith("mailer-daemon@")
        and (not wanted or addr in wanted)
    ]
    spelling: dict[str, str] = {}
    hits: dict[str, _Hit] = {}
    for i, mention in enumerate(mentions):
        key = spelling.setdefault(mention.group(0).lower(), mention.group(0)).lower()
        if key in hits and (hits[key].code or hits[key].status):
            continue
        others = (m.start() for m in mentions[i + 1 :] if m.group(0).lower() != key)
        hit = _find_reply(body[mention.end() : next(others, len(body))])
        if key not in hits or hit.code or hit.status:
            hits[key] = hit
    for addr in failed:
        spelling.setdefault(addr.lower(), addr)
    found = {spelling[k]: hits.get(k, _Hit(None, None, "")) for k in spelling}
    result = {a: h for a, h in found.items() if a.lower() in wanted or h.code or h.status}
    return result if result or len(found) != 1 else found


def _paragraph(text: str) -> str:
    """The first paragraph of ``text``, line breaks kept (a reply may span lines)."""
    return re.split(r"\n[ \t]*\n", text.lstrip(" \t:>\r\n"), maxsplit=1)[0]


def _find_reply(segment: str) -> _Hit:
    """The SMTP reply in the text about one address: code, enhanced status and its text."""
    for regex in (_CODE_WITH_STATUS_RE, _BARE_CODE_RE):
        m = regex.search(segment)
        if m is not None:
            reply = parse_reply(_paragraph(segment[m.start(1) :]))
            text = reply.text.rstrip("'\"# ")[:MAX_DIAGNOSTIC_CHARS]
            return _Hit(reply.code, _status(reply.enhanced), text)
    for regex in (_QMAIL_STATUS_RE, _BARE_STATUS_RE):
        m = regex.search(segment)
        if m is not None:
            text = " ".join(_paragraph(segment.replace(m.group(0), " ", 1)).split())
            return _Hit(None, _status(m.group(1)), text[:MAX_DIAGNOSTIC_CHARS])
    return _Hit(None, None, " ".join(_paragraph(segment).split())[:MAX_DIAGNOSTIC_CHARS])
