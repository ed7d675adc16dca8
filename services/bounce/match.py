"""Which of our messages (and which tenant) a report is about, from signed identifiers only.

In order:
1. the envelope recipient the report came to: a signed VERP return path
   (`services/bounce/verp.py`) names message, recipient index and tenant;
2. otherwise the original message as quoted in the report: its `Return-Path` or the ARF
   `Original-Mail-From` (the same VERP address);
3. then the original `Message-ID` (`<b-<token>-<tenant>@<From domain>>`): the same signed
   token, tagged for Message-IDs, with the tenant always in it;
4. last the original's `List-Unsubscribe` one-click token (`services/bounce/oneclick.py`),
   which names message, tenant and the exact address.

A match found by a token (1 to 3) borrows the one-click token's address when both name the
same message, and its tenant when the token carries none; a token whose tenant the one-click
token of the same message contradicts matches nothing itself. Without an address the report's
own recipient decides (a shared copy's Message-ID names only its first recipient).

A Message-ID that does not verify (forged, another key, or our unsigned
`<message id>.<recipient index>@<from domain>` of before) matches nothing: it only appears in
what an `unmatched` event tells (`quoted_message_id`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from services.bounce.oneclick import Unsubscribe, decode_token, token_in_header
from services.bounce.reports import Report
from services.bounce.verp import VerpToken, decode_message_id, decode_return_path

#: The unsigned Message-ID the sender wrote before it signed them.
_OUR_MESSAGE_ID = re.compile(r"^([A-Za-z0-9_-]{1,32})\.(\d{1,10})@")


@dataclass(frozen=True)
class Origin:
    """The message a report is about. `address`: the recipient for certain, when known."""

    message_id: str
    tenant: str
    address: str | None
    via: str


@dataclass(frozen=True)
class Keys:
    verp: bytes
    unsubscribe: bytes


def find_origin(report: Report, rcpt_tos: Sequence[str], keys: Keys) -> Origin | None:
    one_click = _one_click(report, keys.unsubscribe)
    for token, via in _tokens(report, rcpt_tos, keys.verp):
        same = one_click is not None and one_click.message_id == token.message_id
        borrowed = one_click if same else None
        tenant = token.tenant or (borrowed.tenant if borrowed else None)
        if tenant is not None and (borrowed is None or borrowed.tenant == tenant):
            return Origin(token.message_id, tenant, borrowed.address if borrowed else None, via)
    if one_click is not None:
        return Origin(one_click.message_id, one_click.tenant, one_click.address, "list-unsubscribe")
    return None


def quoted_message_id(report: Report) -> str | None:
    """Our message id in an unsigned original Message-ID of the shape the sender used before."""
    match = _OUR_MESSAGE_ID.match(report.original_message_id or "")
    return match.group(1) if match else None


def _tokens(report: Report, rcpt_tos: Sequence[str], key: bytes) -> Iterator[tuple[VerpToken, str]]:
    """The valid signed tokens, most trusted first: the envelope's, else the quoted return
    path's, then the quoted Message-ID's."""
    envelope = _first_verp(rcpt_tos, key)
    if envelope is not None:
        yield envelope, "verp"
    else:
        headers = report.original_headers
        quoted = _first_verp([report.original_mail_from or "", headers.get("return-path", "")], key)
        if quoted is not None:
            yield quoted, "original return path"
    if report.original_message_id:
        token = decode_message_id(report.original_message_id, key)
        if token is not None:
            yield token, "original message-id"


def _first_verp(addresses: Sequence[str], key: bytes) -> VerpToken | None:
    for address in addresses:
        if address and (token := decode_return_path(address, key)) is not None:
            return token
    return None


def _one_click(report: Report, key: bytes) -> Unsubscribe | None:
    token = token_in_header(report.original_headers.get("list-unsubscribe", ""))
    return None if token is None else decode_token(token, key)
