"""Signed identifiers of one recipient's copy, so that forged or stray reports match nothing.

- the VERP return path ``b-<token>[-<tenant>]@<bounce domain>`` (:func:`encode_return_path`);
- the Message-ID ``<b-<token>-<tenant>@<From domain>>`` (:func:`encode_message_id`).

The token is lower-case base32 (some MTAs lower-case local parts) of

    header byte (2 bits id format, 6 bits id length) | message id | recipient index (LEB128)
    | first 8 bytes of HMAC-SHA256(key, ...)

Message ids are packed by format: a canonical ULID in 16 bytes, lower-case hex in half its
length, any other ``[A-Za-z0-9_-]{1,32}`` at 6 bits a character, so every id round-trips
exactly. The tenant follows in clear (it is lower case already) when the local part stays
within 64 characters; otherwise it is left out and :func:`decode_return_path` gives ``None``
for it (the tenant is known from the message). The tag covers the tenant when it is present.

A Message-ID carries the same token, tagged in a context of its own: a return path is no
valid Message-ID and a Message-ID (quoted in replies, forwards and archives) no valid return
path. A msg-id has no 64-character bound, so it always names the tenant. Its right-hand side
is the From domain as an ASCII host name (IDNA), or the bounce domain when it has none; the
tag does not cover it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import re
from dataclasses import dataclass

import idna

PREFIX = "b-"
MAX_LOCAL_PART_CHARS = 64
MAX_MESSAGE_ID_CHARS = 32
MAX_RECIPIENT_INDEX = 2**32 - 1
MIN_KEY_BYTES = 16
TAG_BYTES = 8

_ULID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ULID_RE = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")
_HEX_RE = re.compile(r"^(?:[0-9a-f]{2}){1,16}$")
_SIX_BIT_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_"
_SIX_BIT_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_TENANT_RE = re.compile(r"^[a-z0-9-]{1,32}$")
_BLOB_RE = re.compile(r"^[a-z2-7]+$")
_DOMAIN_RE = re.compile(
    r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_ULID, _HEX, _SIX_BIT = 0, 1, 2
_CONTEXT = b"mailrail-verp-1"
_MESSAGE_ID_CONTEXT = b"mailrail-message-id-1"
#: The longest Message-ID local part: prefix, 61 base32 characters (a 32-character id of the
#: 6-bit kind, index 2**32 - 1, tag: 38 bytes), a dash and a 32-character tenant.
MAX_MESSAGE_ID_LOCAL_CHARS = len(PREFIX) + 61 + 1 + 32


@dataclass(frozen=True)
class VerpToken:
    """What a valid return path or Message-ID says: the message, which of its recipients, and
    the tenant."""

    message_id: str
    recipient_index: int
    tenant: str | None


def encode_return_path(
    message_id: str, recipient_index: int, bounce_domain: str, tenant: str, key: bytes
) -> str:
    """The signed return path for one recipient of one message (raises ValueError on bad input)."""
    _check_key(key)
    domain = _bounce_domain(bounce_domain)
    payload = _payload(message_id, recipient_index, tenant)
    with_tenant = _local_part(payload, tenant, key, _CONTEXT)
    if len(with_tenant) <= MAX_LOCAL_PART_CHARS:
        return f"{with_tenant}@{domain}"
    return f"{_local_part(payload, None, key, _CONTEXT)}@{domain}"


def decode_return_path(address: str, key: bytes) -> VerpToken | None:
    """The token in a return path, or None when it is not ours, malformed or forged."""
    _check_key(key)
    local, at, _domain = address.strip().strip("<>").rpartition("@")
    if not at:
        return None
    return _decode_local(local, key, _CONTEXT, MAX_LOCAL_PART_CHARS)


def encode_message_id(
    message_id: str,
    recipient_index: int,
    tenant: str,
    from_domain: str,
    bounce_domain: str,
    key: bytes,
) -> str:
    """The signed Message-ID of one recipient's copy, angle brackets included (raises
    ValueError on bad input). Right-hand side: `from_domain` in its ASCII form, else the
    bounce domain."""
    _check_key(key)
    domain = _ascii_host(from_domain) or _bounce_domain(bounce_domain)
    payload = _payload(message_id, recipient_index, tenant)
    return f"<{_local_part(payload, tenant, key, _MESSAGE_ID_CONTEXT)}@{domain}>"


def decode_message_id(value: str, key: bytes) -> VerpToken | None:
    """The token of a Message-ID (with or without angle brackets), or None when it is not
    ours, malformed or forged (our unsigned ``<id>.<index>@domain`` of before included)."""
    _check_key(key)
    local, at, domain = value.strip().strip("<>").rpartition("@")
    if not at or not domain:
        return None
    return _decode_local(local, key, _MESSAGE_ID_CONTEXT, MAX_MESSAGE_ID_LOCAL_CHARS)


def _decode_local(local: str, key: bytes, context: bytes, max_chars: int) -> VerpToken | None:
    local = local.lower()
    if not local.startswith(PREFIX) or len(local) > max_chars:
        return None
    blob, dash, tenant_part = local[len(PREFIX) :].partition("-")
    tenant = tenant_part if dash else None
    if not _BLOB_RE.match(blob) or (tenant is not None and not _TENANT_RE.match(tenant)):
        return None
    try:
        raw = base64.b32decode(blob.upper() + "=" * (-len(blob) % 8))
    except (binascii.Error, ValueError):
        return None
    if _b32(raw) != blob or len(raw) < 3 + TAG_BYTES:
        return None
    payload, tag = raw[:-TAG_BYTES], raw[-TAG_BYTES:]
    if not hmac.compare_digest(tag, _tag(payload, tenant, key, context)):
        return None
    unpacked = _unpack(payload)
    if unpacked is None:
        return None
    return VerpToken(unpacked[0], unpacked[1], tenant)


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
        raise ValueError(f"VERP key must be at least {MIN_KEY_BYTES} bytes")


def _bounce_domain(bounce_domain: str) -> str:
    domain = bounce_domain.strip().lower().rstrip(".")
    if not _DOMAIN_RE.match(domain):
        raise ValueError(f"invalid bounce domain {bounce_domain!r}")
    return domain


@functools.lru_cache(maxsize=1024)
def _ascii_host(domain: str) -> str | None:
    """`domain` as a lower-case ASCII host name (IDNA 2008, as email-validator checks From
    addresses), or None when it has no such form (empty, an address literal, ...)."""
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            return None
    domain = domain.lower()
    return domain if _DOMAIN_RE.match(domain) else None


def _payload(message_id: str, recipient_index: int, tenant: str) -> bytes:
    if not _TENANT_RE.match(tenant):
        raise ValueError(f"invalid tenant {tenant!r}: expected [a-z0-9-]{{1,32}}")
    if not 0 <= recipient_index <= MAX_RECIPIENT_INDEX:
        raise ValueError(f"recipient index {recipient_index} out of range")
    return _pack_id(message_id) + _varint(recipient_index)


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _tag(payload: bytes, tenant: str | None, key: bytes, context: bytes) -> bytes:
    tenant_part = b"\x00" if tenant is None else b"\x01" + tenant.encode("ascii")
    return hmac.digest(key, context + payload + tenant_part, "sha256")[:TAG_BYTES]


def _local_part(payload: bytes, tenant: str | None, key: bytes, context: bytes) -> str:
    blob = _b32(payload + _tag(payload, tenant, key, context))
    return PREFIX + blob + (f"-{tenant}" if tenant is not None else "")


@functools.lru_cache(maxsize=256)
def _pack_id(message_id: str) -> bytes:
    if _ULID_RE.match(message_id):
        value = 0
        for ch in message_id:
            value = value * 32 + _ULID_ALPHABET.index(ch)
        return bytes([_ULID << 6 | len(message_id)]) + value.to_bytes(16, "big")
    if _HEX_RE.match(message_id):
        return bytes([_HEX << 6 | len(message_id)]) + bytes.fromhex(message_id)
    if _SIX_BIT_RE.match(message_id):
        value = 0
        for ch in message_id:
            value = value << 6 | _SIX_BIT_ALPHABET.index(ch)
        size = (6 * len(message_id) + 7) // 8
        return bytes([_SIX_BIT << 6 | len(message_id)]) + value.to_bytes(size, "big")
    raise ValueError(
        f"message id {message_id!r}: expected up to {MAX_MESSAGE_ID_CHARS} of [A-Za-z0-9_-]"
    )


def _unpack(payload: bytes) -> tuple[str, int] | None:
    kind, length = payload[0] >> 6, payload[0] & 0x3F
    if not 1 <= length <= MAX_MESSAGE_ID_CHARS:
        return None
    if kind == _ULID and length == 26:
        size = 16
        value = int.from_bytes(payload[1 : 1 + size], "big")
        message_id = "".join(_ULID_ALPHABET[(value >> (5 * i)) & 31] for i in reversed(range(26)))
    elif kind == _HEX and length % 2 == 0:
        size = length // 2
        message_id = payload[1 : 1 + size].hex()
    elif kind == _SIX_BIT:
        size = (6 * length + 7) // 8
        value = int.from_bytes(payload[1 : 1 + size], "big")
        if value >> (6 * length):
            return None
        chars = (_SIX_BIT_ALPHABET[(value >> (6 * i)) & 63] for i in reversed(range(length)))
        message_id = "".join(chars)
    else:
        return None
    index = _read_varint(payload[1 + size :])
    return None if index is None else (message_id, index)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes) -> int | None:
    """Decode a LEB128 integer that fills ``data`` exactly, in canonical (shortest) form."""
    value = 0
    for i, byte in enumerate(data[:5]):
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i + 1 != len(data) or (byte == 0 and i > 0) or value > MAX_RECIPIENT_INDEX:
                return None
            return value
    return None
