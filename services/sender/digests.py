"""The newest `limit` keys as 96-bit digests, in memory taken once, at construction.

The delivery ledger remembers up to half a million recipients. As a Python `set` of ints plus
a `deque` for their order that cost ~100 bytes a key and grew as the ledger filled (a 30-minute
soak: +32 MiB on an 86 MiB sender). Here the same keys sit in two flat arrays sized for the
limit up front, 37 bytes a key, so a sender's memory does not move when traffic fills it:

- a hash table with linear probing of at least twice `limit` slots, each the digest's first 64
  bits (0 marks a free slot) and its next 32 bits (`checks`);
- a ring of the same digests in the order they came, to evict the oldest once `limit` is
  reached. Eviction shifts the rest of the probe run back (no tombstones, so look-ups never
  slow down with churn).

One writer thread and any number of readers; both take the lock, because a reader that
probed past a slot while an eviction moved a key into it would miss the key.
"""

from __future__ import annotations

import hashlib
import threading
from array import array

#: 96 bits of BLAKE2b per key: at a million keys a look-up is a false hit (a recipient taken
#: for delivered) with probability 1e-23.
DIGEST_BYTES = 12
#: Free slots at least this share of the table: a miss probes ~2.5 slots on average.
MIN_FREE_SHARE = 0.5


def _digest(key: str) -> tuple[int, int]:
    """(the first 64 bits, never 0; the next 32 bits) of the key's BLAKE2b digest."""
    raw = hashlib.blake2b(key.encode(), digest_size=DIGEST_BYTES).digest()
    return int.from_bytes(raw[:8]) or 1, int.from_bytes(raw[8:])


class DigestRing:
    """The newest `limit` keys; adding one more evicts the oldest."""

    def __init__(self, limit: int) -> None:
        self._limit = max(1, limit)
        size = 1
        while size * (1 - MIN_FREE_SHARE) < self._limit:
            size *= 2
        self._mask = size - 1
        # `array * n` writes every element: the memory is resident from here on.
        self._slots = array("Q", [0]) * size
        self._checks = array("I", [0]) * size
        self._ring_slots = array("Q", [0]) * self._limit
        self._ring_checks = array("I", [0]) * self._limit
        self._next = 0  # the ring position the next key goes to
        self._count = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """The bytes the arrays hold (fixed for the object's life)."""
        arrays = (self._slots, self._checks, self._ring_slots, self._ring_checks)
        return sum(a.itemsize * len(a) for a in arrays)

    def add(self, key: str) -> None:
        high, low = _digest(key)
        with self._lock:
            index = self._probe(high, low)
            if self._slots[index] != 0:
                return
            if self._count == self._limit:
                self._remove(self._ring_slots[self._next], self._ring_checks[self._next])
                index = self._probe(high, low)  # the eviction may have moved the run
            else:
                self._count += 1
            self._slots[index] = high
            self._checks[index] = low
            self._ring_slots[self._next] = high
            self._ring_checks[self._next] = low
            self._next = (self._next + 1) % self._limit

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        high, low = _digest(key)
        with self._lock:
            return self._slots[self._probe(high, low)] != 0

    def __len__(self) -> int:
        return self._count

    # -- the table (callers hold the lock) ------------------------------------------------------

    def _probe(self, high: int, low: int) -> int:
        """The key's slot, or else the free slot that ends its probe run."""
        slots, mask = self._slots, self._mask
        i = high & mask
        while (value := slots[i]) != 0:
            if value == high and self._checks[i] == low:
                return i
            i = (i + 1) & mask
        return i

    def _remove(self, high: int, low: int) -> None:
        """Free the key's slot, then move back every later key of its run that may fill it."""
        slots, checks, mask = self._slots, self._checks, self._mask
        hole = self._probe(high, low)
        if slots[hole] == 0:
            return
        i = hole
        while True:
            i = (i + 1) & mask
            value = slots[i]
            if value == 0:
                break
            home = value & mask
            # The key at i may move into the hole unless its home lies cyclically in (hole, i].
            if (hole < i and hole < home <= i) or (i < hole and (home > hole or home <= i)):
                continue
            slots[hole], checks[hole] = value, checks[i]
            hole = i
        slots[hole] = 0
        checks[hole] = 0
