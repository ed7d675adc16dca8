"""DKIM signing (RFC 6376, RFC 8463): relaxed/relaxed, rsa-sha256 and ed25519-sha256.

`DkimSigner.sign` takes one recipient's message as it goes on the wire (CRLF line ends, as
`compose` makes them) and returns it with a `DKIM-Signature` header per key prepended: the
From domain's active keys (or its nearest parent's) and every platform domain's. The body
hash and the canonical headers are computed once per message, whatever the number of keys.

Signed headers are those of `SIGNED_HEADERS` that are present, each listed once more in
`h=` than it occurs (oversigned: an added From, Subject, ... breaks the signature).
"""

import base64
import functools
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.utils import getaddresses

from schemas.addresses import address_of, domain_of
from schemas.records import DeliveryBatch, SmtpReply
from services.sender.dkim_keys import DkimKey, Keyring

SIGNED_HEADERS: tuple[bytes, ...] = (
    b"from",
    b"reply-to",
    b"sender",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"in-reply-to",
    b"references",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"list-id",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
    b"feedback-id",
)
#: Folded lines of the DKIM-Signature header stay under this many characters.
FOLD_WIDTH = 76
B64_LINE = 72

_WSP_RUN = re.compile(rb"[ \t]+")
_HEADER_END = b"\r\n\r\n"


@dataclass(frozen=True)
class Signed:
    data: bytes
    #: For the event: `aligned: d/s, ...`, `unaligned: d/s, ... (why)` or `unsigned: why`.
    summary: str


Clock = Callable[[], float]


class DkimSigner:
    def __init__(
        self, keyring: Keyring, required_tenants: frozenset[str], clock: Clock = time.time
    ) -> None:
        self._keyring = keyring
        self._required = required_tenants
        self._clock = clock

    def refusal(self, batch: DeliveryBatch) -> SmtpReply | None:
        """The reply that holds the batch when its tenant requires a signature it cannot get."""
        if batch.tenant not in self._required:
            return None
        domain = _batch_from_domain(batch)
        if domain is not None and self._keyring.signing_domain(domain, batch.tenant):
            return None
        text = (
            f"held: tenant {batch.tenant} requires DKIM signing and there is no key "
            f"for {domain or 'a message without From'}"
        )
        return SmtpReply(code=451, enhanced="4.3.0", text=text)

    def sign(self, message: bytes, tenant: str) -> Signed:
        """The message with one DKIM-Signature per key that applies (bytes in, bytes out)."""
        fields, body_start = _parse_head(message)
        domain = _from_domain(fields)
        signing = self._keyring.signing_domain(domain, tenant) if domain else None
        own = self._keyring.active[signing] if signing else []
        keys = [*own, *(k for k in self._keyring.platform if k.domain != signing)]
        why = f"no key for {domain}" if domain else "no From header"
        if not keys:
            return Signed(message, f"unsigned: {why}")
        body_hash = _b64(hashlib.sha256(_relaxed_body(message[body_start:])).digest())
        names, signed_headers = _select(fields)
        now = int(self._clock())
        headers = b"".join(sign_header(key, names, body_hash, signed_headers, now) for key in keys)
        done = ", ".join(f"{k.domain}/{k.selector}" for k in keys)
        summary = f"aligned: {done}" if signing else f"unaligned: {done} ({why})"
        return Signed(headers + message, summary)


def sign_header(
    key: DkimKey, names: list[bytes], body_hash: bytes, signed_headers: bytes, now: int
) -> bytes:
    """One complete `DKIM-Signature` header field, CRLF-terminated."""
    tags = [
        b"v=1",
        b"a=" + key.algorithm.encode(),
        b"c=relaxed/relaxed",
        b"d=" + key.domain.encode(),
        b"s=" + key.selector.encode(),
        b"t=%d" % now,
    ]
    field = _fold([b"DKIM-Signature:", *(tag + b";" for tag in tags)], b" ")
    field += b"\r\n\th=" + _fold(names, b":", len(b"\th=")) + b";"
    field += b"\r\n\tbh=" + body_hash + b";"
    field += b"\r\n\tb="
    name, _, value = field.partition(b":")
    signature = key.sign(signed_headers + _relaxed_header(name, value).rstrip(b"\r\n"))
    encoded = _b64(signature)
    chunks = [encoded[i : i + B64_LINE] for i in range(0, len(encoded), B64_LINE)]
    return field + b"\r\n\t ".join(chunks) + b"\r\n"


def _parse_head(message: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
    """Header fields as (name, raw value with folds) and where the body starts."""
    end = message.find(_HEADER_END)
    head, body_start = (message, len(message)) if end < 0 else (message[: end + 2], end + 4)
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
        elif b":" in line:
            name, _, value = line.partition(b":")
            fields.append((name, value))
    return fields, body_start


def _select(fields: list[tuple[bytes, bytes]]) -> tuple[list[bytes], bytes]:
    """`h=` names (present ones, each once more than it occurs) and their canonical bytes."""
    by_name: dict[bytes, list[tuple[bytes, bytes]]] = {}
    for name, value in fields:
        lowered = name.strip().lower()
        if lowered in SIGNED_HEADERS:
            by_name.setdefault(lowered, []).append((name, value))
    names: list[bytes] = []
    canonical: list[bytes] = []
    for name in SIGNED_HEADERS:
        found = by_name.get(name)
        if not found:
            continue
        names += [name] * (len(found) + 1)
        canonical += [_relaxed_header(n, v) for n, v in reversed(found)]
    return names, b"".join(canonical)


def _relaxed_header(name: bytes, value: bytes) -> bytes:
    unfolded = value.replace(b"\r\n", b"")
    return name.strip().lower() + b":" + _WSP_RUN.sub(b" ", unfolded).strip(b" ") + b"\r\n"


def _relaxed_body(body: bytes) -> bytes:
    """WSP runs → one SP, none at line ends, no empty lines at the end (str methods: fast)."""
    body = body.replace(b"\t", b" ")
    while b"  " in body:
        body = body.replace(b"  ", b" ")
    body = body.replace(b" \r\n", b"\r\n").rstrip(b" \r\n")
    return body + b"\r\n" if body else b""


def _fold(parts: list[bytes], separator: bytes, start: int = 0) -> bytes:
    """Join parts with `separator`, breaking the line (CRLF TAB) before it would pass the width."""
    out = bytearray()
    width = start
    for index, part in enumerate(parts):
        piece = part if index == 0 else separator + part
        if index and width + len(piece) > FOLD_WIDTH:
            out += separator.rstrip(b" ") + b"\r\n\t"
            piece, width = part, 1
        out += piece
        width += len(piece)
    return bytes(out)


def _from_domain(fields: list[tuple[bytes, bytes]]) -> str | None:
    values = [v for n, v in fields if n.strip().lower() == b"from"]
    return _address_domain(values[0]) if len(values) == 1 else None


@functools.lru_cache(maxsize=1024)
def _address_domain(value: bytes) -> str | None:
    """The domain of the one address in a From value (cached: a batch repeats it)."""
    text = value.replace(b"\r\n", b"").decode("utf-8", "replace")
    addresses = [a for _, a in getaddresses([text]) if "@" in a]
    return domain_of(addresses[0]).lower() if len(addresses) == 1 else None


def _batch_from_domain(batch: DeliveryBatch) -> str | None:
    raw = batch.content.raw_bytes()
    if raw is None:
        return domain_of(address_of(batch.from_)).lower()
    header_from = BytesHeaderParser().parsebytes(raw).get_all("From") or []
    addresses = [a for _, a in getaddresses([str(v) for v in header_from]) if "@" in a]
    return domain_of(addresses[0]).lower() if len(addresses) == 1 else None


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)
