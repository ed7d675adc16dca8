"""A compact hash table of byte-string keys and values, for views of millions of records.

A dict of Python objects costs hundreds of bytes an entry; here an entry costs one 8-byte
slot (open addressing, linear probing, at most 60% full) plus its record in one bytearray:
key length and value length (2 bytes each), the key, the value. A slot holds a 24-bit tag
from the key's hash (most probes are decided without touching the arena) and the record's
offset. Replaced and removed records stay in the arena as garbage until it is more than half
of it; then the arena is rewritten (`layout` changes, so offsets held elsewhere are stale).

Not thread-safe: callers lock.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

MAX_KEY_BYTES = 0xFFFF
MAX_VALUE_BYTES = 0xFFFF
MAX_LOAD = 0.6
COMPACT_MIN_GARBAGE_BYTES = 1 << 20
_HEADER_BYTES = 4
_MIN_CAPACITY = 8
_OFFSET_BITS = 40
_OFFSET_MASK = (1 << _OFFSET_BITS) - 1
_HASH_MASK = (1 << 64) - 1
_EMPTY, _DELETED = 0, 1
#: Offsets are stored plus this, so no live slot looks empty or deleted.
_BIAS = 2


class CompactTable:
    def __init__(self) -> None:
        self._slots = array("Q", bytes(8 * _MIN_CAPACITY))
        self._mask = _MIN_CAPACITY - 1
        self._arena = bytearray()
        self._live = 0
        self._used = 0  # live and deleted slots
        self._garbage = 0
        #: Changes whenever records move (arena rewritten): offsets from `offsets()` expire.
        self.layout = 0

    def __len__(self) -> int:
        return self._live

    def __contains__(self, key: bytes) -> bool:
        return self._find(key)[1] >= 0

    def get(self, key: bytes) -> bytes | None:
        offset = self._find(key)[1]
        return None if offset < 0 else self.value_at(offset)

    def put(self, key: bytes, value: bytes) -> None:
        if len(key) > MAX_KEY_BYTES or len(value) > MAX_VALUE_BYTES:
            raise ValueError(f"key or value over {MAX_KEY_BYTES} bytes")
        if (self._used + 1) > MAX_LOAD * (self._mask + 1):
            self._rehash()
        index, offset, tag = self._find(key)
        if offset >= 0:
            self._garbage += self._record_size(offset)
        else:
            self._live += 1
            if self._slots[index] == _EMPTY:
                self._used += 1
        new_offset = len(self._arena)
        self._arena += len(key).to_bytes(2, "little") + len(value).to_bytes(2, "little")
        self._arena += key
        self._arena += value
        self._slots[index] = tag << _OFFSET_BITS | (new_offset + _BIAS)
        self._maybe_compact()

    def delete(self, key: bytes) -> bool:
        index, offset, _ = self._find(key)
        if offset < 0:
            return False
        self._slots[index] = _DELETED
        self._live -= 1
        self._garbage += self._record_size(offset)
        self._maybe_compact()
        return True

    def offsets(self) -> Iterator[int]:
        """The record offset of every live entry, in no particular order."""
        for slot in self._slots:
            if slot > _DELETED:
                yield (slot & _OFFSET_MASK) - _BIAS

    def key_at(self, offset: int) -> bytes:
        arena = self._arena
        start = offset + _HEADER_BYTES
        return bytes(arena[start : start + (arena[offset] | arena[offset + 1] << 8)])

    def value_at(self, offset: int) -> bytes:
        arena = self._arena
        start = offset + _HEADER_BYTES + (arena[offset] | arena[offset + 1] << 8)
        return bytes(arena[start : start + (arena[offset + 2] | arena[offset + 3] << 8)])

    def memory_bytes(self) -> int:
        """Bytes held by the slots and the arena (allocated, not just used)."""
        return self._slots.buffer_info()[1] * self._slots.itemsize + self._arena.__sizeof__()

    def _record_size(self, offset: int) -> int:
        arena = self._arena
        key_len = arena[offset] | arena[offset + 1] << 8
        value_len = arena[offset + 2] | arena[offset + 3] << 8
        return _HEADER_BYTES + key_len + value_len

    def _find(self, key: bytes) -> tuple[int, int, int]:
        """(slot for the key, its record offset or -1, its tag). The slot is where the key is,
        else the first deleted slot on its probe path, else the empty slot that ended it."""
        h = hash(key) & _HASH_MASK
        tag = h >> _OFFSET_BITS
        mask = self._mask
        slots = self._slots
        arena = self._arena
        size = len(key)
        index = h & mask
        free = -1
        while True:
            slot = slots[index]
            if slot == _EMPTY:
                return (index if free < 0 else free), -1, tag
            if slot == _DELETED:
                if free < 0:
                    free = index
            elif slot >> _OFFSET_BITS == tag:
                offset = (slot & _OFFSET_MASK) - _BIAS
                start = offset + _HEADER_BYTES
                if (arena[offset] | arena[offset + 1] << 8) == size and (
                    arena[start : start + size] == key
                ):
                    return index, offset, tag
            index = (index + 1) & mask

    def _rehash(self) -> None:
        """Grow (or only drop deleted slots): afterwards at most half the slots are used."""
        capacity = _MIN_CAPACITY
        while (self._live + 1) > capacity // 2:
            capacity *= 2
        old = self._slots
        self._slots = array("Q", bytes(8 * capacity))
        self._mask = capacity - 1
        self._place_all(slot for slot in old if slot > _DELETED)
        self._used = self._live

    def _place_all(self, live_slots: Iterator[int]) -> None:
        slots, mask = self._slots, self._mask
        for slot in live_slots:
            offset = (slot & _OFFSET_MASK) - _BIAS
            index = hash(self.key_at(offset)) & _HASH_MASK & mask
            while slots[index] != _EMPTY:
                index = (index + 1) & mask
            slots[index] = slot

    def _maybe_compact(self) -> None:
        if self._garbage < COMPACT_MIN_GARBAGE_BYTES or self._garbage * 2 < len(self._arena):
            return
        old = self._arena
        arena = bytearray()
        slots = self._slots
        for index, slot in enumerate(slots):
            if slot > _DELETED:
                offset = (slot & _OFFSET_MASK) - _BIAS
                size = self._record_size(offset)
                slots[index] = (slot >> _OFFSET_BITS) << _OFFSET_BITS | (len(arena) + _BIAS)
                arena += old[offset : offset + size]
        self._arena = arena
        self._garbage = 0
        self.layout += 1
