"""Memory of the suppression view: bytes per suppressed address at 1M addresses.

    python -m bench.suppression_memory                  # SuppressionView, 1,000,000 addresses
    python -m bench.suppression_memory --baseline       # also the old dict of pydantic models
    python -m bench.suppression_memory -n 100000 --json out.json

Entries go through `SuppressionView.apply()` (what the view does with every record it reads
from `mail.suppression`), with no broker. The mix is what a bulk sender's list looks like:
mostly hard bounces with the remote server's reply as detail (some quoting the address, some
with a per-message trace id), then unsubscribes, complaints, soft-bounce limits and manual
entries, over 20 tenants. Memory is what the view retains (tracemalloc, after a full
collection), and the process's RSS growth as a cross-check; lookups and a page are timed
after loading.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import string
import sys
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from schemas.records import EventType, Suppression, SuppressionReason, suppression_key
from services.runtime.suppression import SuppressionView

DEFAULT_ADDRESSES = 1_000_000
LOOKUPS = 200_000
TENANTS = [f"tenant-{i:02d}" for i in range(20)]
_HARD_DETAILS = [
    "550 5.1.1 <{address}>: Recipient address rejected: User unknown in virtual mailbox table",
    "550 5.1.1 The email account that you tried to reach does not exist. Please try"
    " double-checking the recipient's email address for typos or unnecessary spaces."
    " For more information, go to https://support.google.com/mail/?p=NoSuchUser {trace}",
    "550 5.5.0 Requested action not taken: mailbox unavailable",
    "554 5.2.1 Mailbox disabled for this recipient",
    "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient {address} not found by SMTP"
    " address lookup",
    "512 5.1.2 Host or domain name not found. Name service error for name={domain}",
]


class View(Protocol):
    def apply(self, key: str, entry: Suppression | None) -> None: ...
    def is_suppressed(self, tenant: str, address: str) -> bool: ...
    def __len__(self) -> int: ...


class DictOfModels:
    """The view's storage before the redesign: one pydantic model per key in a dict."""

    def __init__(self) -> None:
        self._entries: dict[str, Suppression] = {}

    def apply(self, key: str, entry: Suppression | None) -> None:
        if entry is None:
            self._entries.pop(key, None)
        else:
            self._entries[key] = entry

    def is_suppressed(self, tenant: str, address: str) -> bool:
        return suppression_key(tenant, address) in self._entries

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class Result:
    design: str
    addresses: int
    bytes_per_address: float
    rss_bytes_per_address: float
    load_s: float
    lookup_us: float
    page_ms: float | None


def _message_id(rng: random.Random) -> str:
    """Like ingest's: 32 hex characters (milliseconds, then random bits)."""
    return f"{rng.getrandbits(128):032x}"


def _address(i: int, rng: random.Random) -> str:
    first = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9)))
    last = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 10)))
    return f"{first}.{last}{i}@d{i % 997}.example.com"


def entries(count: int, seed: int = 7) -> Iterator[tuple[str, Suppression]]:
    """`count` distinct suppressions, always the same for one seed."""
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(count):
        tenant = TENANTS[i % len(TENANTS)]
        address = _address(i, rng)
        created = start + timedelta(seconds=rng.randint(0, 330 * 86400))
        roll = rng.random()
        detail: str | None = None
        if roll < 0.70:
            reason, event = SuppressionReason.HARD_BOUNCE, EventType.BOUNCED
            template = rng.choice(_HARD_DETAILS)
            detail = template.format(
                address=address, domain=address.partition("@")[2], trace=_message_id(rng)[:20]
            )
        elif roll < 0.85:
            reason, event = SuppressionReason.UNSUBSCRIBE, EventType.UNSUBSCRIBED
        elif roll < 0.93:
            reason, event = SuppressionReason.COMPLAINT, EventType.COMPLAINED
        elif roll < 0.98:
            reason, event = SuppressionReason.SOFT_BOUNCE_LIMIT, EventType.EXPIRED
            detail = "3 soft bounces within 7 days; last: 452 4.2.2 Mailbox full"
        else:
            reason, event = SuppressionReason.MANUAL, None
            detail = "asked by phone"
        entry = Suppression(
            tenant=tenant,
            address=address,
            reason=reason,
            created_at=created,
            source_message_id=None if event is None else _message_id(rng),
            source_event=event,
            detail=detail,
        )
        yield suppression_key(tenant, address), entry


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def measure(design: str, view: View, count: int, trace: bool) -> Result:
    keys: list[tuple[str, str]] = []
    gc.collect()
    if trace:
        tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0] if trace else 0
    rss_before = _rss_bytes()
    started = time.perf_counter()
    for n, (key, entry) in enumerate(entries(count)):
        view.apply(key, entry)
        if n % (count // 1000 or 1) == 0:
            keys.append((entry.tenant, entry.address))
    load_s = time.perf_counter() - started
    gc.collect()
    # The sampled keys (at most 1,000 tuples) are the bench's own: counted out below.
    held = sum(sys.getsizeof(t) + sys.getsizeof(t[0]) + sys.getsizeof(t[1]) for t in keys)
    held += sys.getsizeof(keys)
    retained = (tracemalloc.get_traced_memory()[0] - traced_before - held) if trace else 0
    rss = _rss_bytes() - rss_before
    if trace:
        tracemalloc.stop()
    assert len(view) == count, (len(view), count)
    probes = [keys[i % len(keys)] for i in range(LOOKUPS // 2)]
    probes += [(tenant, "nobody-" + address) for tenant, address in probes]
    started = time.perf_counter()
    hits = sum(view.is_suppressed(tenant, address) for tenant, address in probes)
    lookup_us = (time.perf_counter() - started) / len(probes) * 1e6
    assert hits == LOOKUPS // 2, hits
    page_ms = None
    if isinstance(view, SuppressionView):
        started = time.perf_counter()
        page = view.page(TENANTS[3], None, 100)
        page_ms = (time.perf_counter() - started) * 1000
        assert len(page) == 100 and [e.address for e in page] == sorted(e.address for e in page)
    return Result(design, count, retained / count, rss / count, load_s, lookup_us, page_ms)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.suppression_memory", description=__doc__)
    parser.add_argument("-n", "--addresses", type=int, default=DEFAULT_ADDRESSES)
    parser.add_argument(
        "--baseline", action="store_true", help="also measure the old dict of pydantic models"
    )
    parser.add_argument(
        "--no-tracemalloc", action="store_true", help="RSS only (faster, less precise)"
    )
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    trace = not args.no_tracemalloc
    results = [measure("SuppressionView", SuppressionView({}), args.addresses, trace)]
    if args.baseline:
        gc.collect()
        results.append(measure("dict of Suppression models", DictOfModels(), args.addresses, trace))
    for r in results:
        page = f", first page of a tenant {r.page_ms:.0f} ms" if r.page_ms is not None else ""
        retained = f"{r.bytes_per_address:.0f} bytes/address retained, " if trace else ""
        print(
            f"{r.design}: {r.addresses:,} addresses, {retained}"
            f"{r.rss_bytes_per_address:.0f} bytes/address RSS growth, loaded in {r.load_s:.1f} s,"
            f" lookup {r.lookup_us:.2f} µs{page}"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
