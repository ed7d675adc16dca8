"""Native memory of a service process: fewer glibc malloc arenas, freed pages given back.

librdkafka's threads (several per consumer and producer) allocate their buffers in
per-thread malloc arenas, and glibc keeps up to eight per core of them, each holding on to
what it once needed: a sender at full load ended up near 230 MiB resident with under 50 MiB
of Python objects. Two arenas serve a process of a few busy threads as well and keep that
memory reused instead of spread. Set before any client starts its threads (`run_service`
does it first); `MALLOC_ARENA_MAX` in the environment wins, as glibc reads it itself.
"""

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)

M_ARENA_MAX = -8
M_MMAP_THRESHOLD = -3
ARENAS = 2
#: Allocations from this size up get pages of their own, given back when freed (fetch
#: buffers, record batches); a fixed threshold also stops glibc raising it to 32 MiB.
MMAP_THRESHOLD_BYTES = 1 << 20


TRIM_INTERVAL_S = 10.0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once (`find_library` runs `ldconfig`)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


async def trim_periodically(stop: asyncio.Event, interval_s: float = TRIM_INTERVAL_S) -> None:
    """Give freed heap pages back to the system every `interval_s` (glibc `malloc_trim`):
    what a burst of load needed does not stay resident after it."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    while trim is not None and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
        trim(0)


def bound_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Limit glibc's malloc arenas; False where that cannot be done (not glibc)."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    return bool(libc.mallopt(M_ARENA_MAX, arenas))
