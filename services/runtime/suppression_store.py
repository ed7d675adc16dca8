"""Where the suppression view keeps its entries: compact bytes, one table per tenant.

An entry is packed into one record of a :class:`CompactTable` keyed by the address (domain
lower-cased, as in the topic's key): reason and source event (one byte each), the time (8
bytes, microseconds since the epoch, UTC), the source message id (16 bytes for Mailrail's
32-hex ids) and the detail: UTF-8, or raw DEFLATE when that is shorter, with a preset
dictionary of common SMTP reply wording plus the entry's own address (replies often quote
it). `bench/suppression_memory.py` measures the result.

Paging in address order keeps, per tenant, the record offsets sorted by address (built on the
first page asked for) plus the set of addresses changed since; it is rebuilt when the changes
pile up or the table's records move. Not thread-safe: the view locks.
"""

from __future__ import annotations

import re
import struct
import zlib
from array import array
from bisect import bisect_right
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from schemas.records import EventType, Suppression, SuppressionReason, suppression_key
from services.runtime.compact_table import MAX_VALUE_BYTES, CompactTable

_FIXED = struct.Struct("<BBqB")  # reason, source event (+1, 0 = none), µs since epoch, id length
_REASONS = list(SuppressionReason)
_REASON_CODES = {reason: i for i, reason in enumerate(_REASONS)}
_EVENTS = list(EventType)
_EVENT_CODES = {event: i + 1 for i, event in enumerate(_EVENTS)}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_ID_BYTES = 0x7F
_PACKED_ID = 0x80
_HEX_ID = re.compile(r"^(?:[0-9a-f]{2}){1,127}$")
_RAW_DETAIL, _DEFLATED_DETAIL = b"\x01", b"\x02"
_VOCABULARY = (
    b"Service unavailable Message rejected Access denied blocked policy spam reputation "
    b"Host or domain name not found. Name service error for name= type=MX: Host not found "
    b"Relay access denied try again later temporarily deferred Too many connections "
    b"account has been disabled inactive suspended does not exist no such user here "
    b"Mailbox disabled for this recipient Mailbox full over quota Mailbox unavailable "
    b"Requested action not taken: mailbox unavailable invalid recipient "
    b"RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup "
    b"The email account that you tried to reach does not exist. Please try "
    b"double-checking the recipient's email address for typos or unnecessary spaces. "
    b"For more information, go to https://support.google.com/mail/?p=NoSuchUser "
    b"Recipient address rejected: User unknown in virtual mailbox table User unknown "
    b"soft bounces within days; last: 550 5.1.1 <"
)
#: Changed addresses a tenant's sorted order tolerates before it is rebuilt.
MIN_RUN_CHANGES = 1000


def split_key(key: str) -> tuple[str, str]:
    """`tenant/address` → (tenant, address)."""
    tenant, _, address = key.partition("/")
    return tenant, address


def pack(entry: Suppression, address: bytes) -> bytes:
    """The entry as stored under `address` (its key: the domain lower-cased)."""
    created = entry.created_at
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    micros = (created - _EPOCH) // timedelta(microseconds=1)
    source_id = entry.source_message_id or ""
    if _HEX_ID.match(source_id):
        source = bytes.fromhex(source_id)
        id_byte = _PACKED_ID | len(source)
    else:
        source = source_id.encode()[:_MAX_ID_BYTES].decode(errors="ignore").encode()
        id_byte = len(source)
    event = 0 if entry.source_event is None else _EVENT_CODES[entry.source_event]
    head = _FIXED.pack(_REASON_CODES[entry.reason], event, micros, id_byte) + source
    if entry.detail is None:
        return head
    room = MAX_VALUE_BYTES - len(head) - 1
    detail = entry.detail.encode()[:room].decode(errors="ignore").encode()
    deflate = zlib.compressobj(
        9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, zdict=_VOCABULARY + address
    )
    deflated = deflate.compress(detail) + deflate.flush()
    if len(deflated) < len(detail):
        return head + _DEFLATED_DETAIL + deflated
    return head + _RAW_DETAIL + detail


def unpack(tenant: str, address: bytes, value: bytes) -> Suppression:
    reason, event, micros, id_byte = _FIXED.unpack_from(value)
    start = _FIXED.size
    id_len = id_byte & ~_PACKED_ID
    raw_id = value[start : start + id_len]
    source = raw_id.hex() if id_byte & _PACKED_ID else raw_id.decode()
    rest = value[start + id_len :]
    detail = None
    if rest[:1] == _DEFLATED_DETAIL:
        inflate = zlib.decompressobj(-15, zdict=_VOCABULARY + address)
        detail = (inflate.decompress(rest[1:]) + inflate.flush()).decode()
    elif rest:
        detail = rest[1:].decode()
    return Suppression.model_construct(
        tenant=tenant,
        address=address.decode(),
        reason=_REASONS[reason],
        created_at=_EPOCH + timedelta(microseconds=micros),
        source_message_id=source or None,
        source_event=_EVENTS[event - 1] if event else None,
        detail=detail,
    )


@dataclass
class _Run:
    """One tenant's record offsets in address order, as of `layout`, and what changed since."""

    offsets: array[int]
    layout: int
    changed: set[bytes] = field(default_factory=set)


class SuppressionStore:
    def __init__(self) -> None:
        self._tables: dict[str, CompactTable] = {}
        self._runs: dict[str, _Run] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def contains(self, tenant: str, address: str) -> bool:
        table = self._tables.get(tenant)
        return table is not None and _address_key(tenant, address) in table

    def get(self, tenant: str, address: str) -> Suppression | None:
        table = self._tables.get(tenant)
        if table is None:
            return None
        key = _address_key(tenant, address)
        value = table.get(key)
        return None if value is None else unpack(tenant, key, value)

    def apply(self, key: str, entry: Suppression | None) -> None:
        """Store (or, for None, remove) the entry of a `tenant/address` key."""
        tenant, address = split_key(key)
        address_key = address.encode()
        table = self._tables.get(tenant)
        if entry is None:
            if table is None or not table.delete(address_key):
                return
            self._count -= 1
            if not table:
                del self._tables[tenant]
                self._runs.pop(tenant, None)
        else:
            if table is None:
                table = self._tables[tenant] = CompactTable()
            before = len(table)
            table.put(address_key, pack(entry, address_key))
            self._count += len(table) - before
        run = self._runs.get(tenant)
        if run is not None:
            run.changed.add(address_key)
            if len(run.changed) > max(MIN_RUN_CHANGES, len(run.offsets) // 10):
                del self._runs[tenant]

    def page(self, tenant: str, after: str | None, limit: int) -> list[Suppression]:
        """Up to `limit` entries of the tenant in address order, after the address `after`."""
        table = self._tables.get(tenant)
        if table is None or limit <= 0:
            return []
        run = self._runs.get(tenant)
        if run is None or run.layout != table.layout:
            ordered = array("Q", sorted(table.offsets(), key=table.key_at))
            run = self._runs[tenant] = _Run(ordered, table.layout)
        floor = (after or "").encode()
        start = bisect_right(run.offsets, floor, key=table.key_at) if after else 0
        keys: list[bytes] = []
        offsets = run.offsets
        while start < len(offsets) and len(keys) < limit:
            key = table.key_at(offsets[start])
            if key not in run.changed:
                keys.append(key)
            start += 1
        keys += [k for k in run.changed if (not after or k > floor) and k in table]
        keys.sort()
        result = []
        for key in keys[:limit]:
            value = table.get(key)
            if value is not None:
                result.append(unpack(tenant, key, value))
        return result

    def memory_bytes(self) -> int:
        return sum(t.memory_bytes() for t in self._tables.values())


def _address_key(tenant: str, address: str) -> bytes:
    return split_key(suppression_key(tenant, address))[1].encode()
