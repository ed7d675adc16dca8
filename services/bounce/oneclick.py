"""One-click unsubscribe (RFC 8058): signed tokens and the List-Unsubscribe headers.

The sender puts a per-recipient token in every message's List-Unsubscribe URL
(`<public url>/v1/unsubscribe/<token>`); ingest's endpoint verifies it and records the
unsubscribe; the bounce service also reads it back from the original headers quoted in a
bounce or complaint, as proof of which message, recipient and tenant a report is about.

A token is URL-safe base64 (no padding) of

    version byte | tenant length | tenant | message id length | message id | address (UTF-8)
    | first 16 bytes of HMAC-SHA256(key, context | all of the above)

so nobody without the key can make one for an address that was not sent that message.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import logging
import re
from dataclasses import dataclass
from urllib.parse import quote

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

VERSION = 1
TAG_BYTES = 16
MIN_KEY_BYTES = 16
MAX_TOKEN_CHARS = 1000
ONE_CLICK = "List-Unsubscribe=One-Click"
_CONTEXT = b"mailrail-unsubscribe-1"
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{20,1000}$")
_URL_TOKEN_RE = re.compile(r"/v1/unsubscribe/([A-Za-z0-9_-]{20,1000})(?=[>?#\s,]|$)")
_SUBJECT_TOKEN_RE = re.compile(r"\bunsubscribe[ :]+([A-Za-z0-9_-]{20,1000})", re.IGNORECASE)


class UnsubscribeSettings(BaseSettings):
    """Read by the sender (links), ingest (the endpoint) and bounce (reports, mailto)."""

    model_config = SettingsConfigDict(env_prefix="MAILRAIL_", frozen=True, extra="ignore")

    #: Where recipients reach ingest's HTTP API from outside, e.g. `https://mail.example.com`.
    #: Unset: the sender cannot make a link anyone could open, so it adds no List-Unsubscribe.
    public_url: str | None = None
    #: Signs and verifies the tokens: the same value for senders, ingest and bounce.
    unsubscribe_key: SecretStr = SecretStr("mailrail-local-unsubscribe-key")
    #: Optional `mailto:` address (served by the bounce service) offered beside the URL.
    unsubscribe_mailto: str | None = None

    def links(self) -> OneClickLinks | None:
        if not self.public_url:
            return None
        return OneClickLinks(
            self.public_url.rstrip("/"),
            self.unsubscribe_key.get_secret_value().encode(),
            self.unsubscribe_mailto,
        )

    def key(self) -> bytes:
        return self.unsubscribe_key.get_secret_value().encode()


@dataclass(frozen=True)
class Unsubscribe:
    """What a valid token says: this address was sent this message of this tenant."""

    tenant: str
    message_id: str
    address: str


def encode_token(tenant: str, message_id: str, address: str, key: bytes) -> str:
    _check_key(key)
    parts = [tenant.encode(), message_id.encode()]
    if any(len(p) > 0xFF for p in parts):
        raise ValueError("tenant or message id too long for a token")
    payload = bytes([VERSION]) + b"".join(bytes([len(p)]) + p for p in parts) + address.encode()
    return _b64(payload + _tag(payload, key))


def decode_token(token: str, key: bytes) -> Unsubscribe | None:
    """The token's content, or None when it is malformed or not signed with `key`."""
    _check_key(key)
    if not _TOKEN_RE.match(token):
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    payload, tag = raw[:-TAG_BYTES], raw[-TAG_BYTES:]
    if len(payload) < 3 or not hmac.compare_digest(tag, _tag(payload, key)):
        return None
    if payload[0] != VERSION:
        return None
    try:
        fields, at = [], 1
        for _ in range(2):
            size = payload[at]
            fields.append(payload[at + 1 : at + 1 + size].decode())
            at += 1 + size
        address = payload[at:].decode()
    except (IndexError, UnicodeDecodeError):
        return None
    if not fields[0] or not fields[1] or "@" not in address:
        return None
    return Unsubscribe(fields[0], fields[1], address)


def token_in_header(value: str) -> str | None:
    """The token of a List-Unsubscribe value (its one-click URL), if there is one."""
    match = _URL_TOKEN_RE.search(value)
    return match.group(1) if match else None


def token_in_subject(value: str) -> str | None:
    """The token of an unsubscribe mail's Subject (`unsubscribe <token>`), if there is one."""
    match = _SUBJECT_TOKEN_RE.search(value)
    return match.group(1) if match else None


@dataclass(frozen=True)
class OneClickLinks:
    public_url: str
    key: bytes
    mailto: str | None = None

    def url(self, tenant: str, message_id: str, address: str) -> str:
        return f"{self.public_url}/v1/unsubscribe/{encode_token(tenant, message_id, address, self.key)}"

    def headers(self, tenant: str, message_id: str, address: str) -> bytes:
        """The two header lines (CRLF-terminated), folded between the URIs."""
        token = encode_token(tenant, message_id, address, self.key)
        uris = [f"<{self.public_url}/v1/unsubscribe/{token}>"]
        if self.mailto:
            uris.append(f"<mailto:{self.mailto}?subject={quote('unsubscribe ' + token)}>")
        lines = "List-Unsubscribe: " + ",\r\n ".join(uris) + "\r\n"
        return (lines + f"List-Unsubscribe-Post: {ONE_CLICK}\r\n").encode()


@functools.cache
def default_links() -> OneClickLinks | None:
    """The links of this process's environment (read once); None without a public URL."""
    links = UnsubscribeSettings().links()
    if links is None:
        log.warning("MAILRAIL_PUBLIC_URL is not set: messages carry no List-Unsubscribe")
    return links


def _check_key(key: bytes) -> None:
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"unsubscribe key must be at least {MIN_KEY_BYTES} bytes")


def _tag(payload: bytes, key: bytes) -> bytes:
    return hmac.new(key, _CONTEXT + payload, hashlib.sha256).digest()[:TAG_BYTES]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")
