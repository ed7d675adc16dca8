"""Which of our messages (and which tenant) a report is about, from signed identifiers only.

In order:
1. the envelope recipient the report came to: a signed VERP return path
   (`services/bounce/verp.py`) names message, recipient index and tenant;
2. otherwise the original message as quoted in the report: its `Return-Path` or the ARF
   `Original-Mail-From` (the same VERP address), or its `List-Unsubscribe` one-click token
   (`services/bounce/oneclick.py`), which names message, tenant and the exact address.
   The original `Message-ID` (`<message id>.<recipient index>@<from domain>`) says which
   message, but anyone can quote one and it names no tenant: on its own it matches nothing,
   and it only appears in what an `unmatched` event tells.

A match found by VERP borrows the one-click token's address when both name the same message,
and its tenant when the VERP address was too long to carry one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from services.bounce.oneclick import Unsubscribe, decode_token, token_in_header
from services.bounce.reports import Report
from services.bounce.verp import VerpToken, decode_return_path

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
    envelope = _first_verp(rcpt_tos, keys.verp)
    quoted = None
    if envelope is None:
        headers = report.original_headers
        quoted = _first_verp(
            [report.original_mail_from or "", headers.get("return-path", "")], keys.verp
        )
    verp, via = (envelope, "verp") if envelope else (quoted, "original return path")
    if verp is not None:
        same = one_click is not None and one_click.message_id == verp.message_id
        tenant = verp.tenant or (one_click.tenant if one_click and same else None)
        if tenant is not None and (one_click is None or not same or one_click.tenant == tenant):
            address = one_click.address if one_click and same else None
            return Origin(verp.message_id, tenant, address, via)
    if one_click is not None:
        return Origin(one_click.message_id, one_click.tenant, one_click.address, "list-unsubscribe")
    return None


def quoted_message_id(report: Report) -> str | None:
    """Our message id in the original Message-ID the report quotes, if it has our shape."""
    match = _OUR_MESSAGE_ID.match(report.original_message_id or "")
    return match.group(1) if match else None


def _first_verp(addresses: Sequence[str], key: bytes) -> VerpToken | None:
    for address in addresses:
        if address and (token := decode_return_path(address, key)) is not None:
            return token
    return None


def _one_click(report: Report, key: bytes) -> Unsubscribe | None:
    token = token_in_header(report.original_headers.get("list-unsubscribe", ""))
    return None if token is None else decode_token(token, key)
