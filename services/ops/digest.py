"""The last hour of `mail.events` in numbers: outcomes per minute, bounces by category.

`EventDigest.add()` takes each event's raw JSON and its Kafka timestamp; memory is bounded
by the window (one small counter per minute) and `RECENT` bounce summaries. Follow the topic
with `services.runtime.follow.Follower` from `window` ago (see `services/ingest/admin.py`).
"""

import threading
from collections import Counter, deque
from dataclasses import dataclass, field

import orjson

WINDOW_MINUTES = 60
RECENT = 20
#: What the chart draws, in this order.
SERIES = ("delivered", "deferred", "bounced")
_COUNTED = frozenset({*SERIES, "accepted", "expired", "suppressed", "complained"})


@dataclass(frozen=True)
class RecentBounce:
    ts_s: float
    domain: str
    category: str
    reply: str
    pool: str


@dataclass
class Digest:
    """A copy taken under the lock, for one page or answer."""

    #: (minute start in epoch seconds, counts by event type), oldest first, every minute.
    minutes: list[tuple[int, dict[str, int]]]
    totals: dict[str, int]
    bounces_by_category: dict[str, int]
    recent_bounces: list[RecentBounce] = field(default_factory=list)


class EventDigest:
    def __init__(self, window_minutes: int = WINDOW_MINUTES) -> None:
        self._window = window_minutes
        self._counts: dict[int, Counter[str]] = {}
        self._categories: dict[int, Counter[str]] = {}
        self._recent: deque[RecentBounce] = deque(maxlen=RECENT)
        self._lock = threading.Lock()

    def add(self, value: bytes, ts_ms: int) -> None:
        try:
            event = orjson.loads(value)
        except orjson.JSONDecodeError:
            return
        kind = event.get("type") if isinstance(event, dict) else None
        if kind not in _COUNTED:
            return
        minute = ts_ms // 60000
        with self._lock:
            self._counts.setdefault(minute, Counter())[kind] += 1
            if kind == "bounced":
                category = str(event.get("category") or "other")
                self._categories.setdefault(minute, Counter())[category] += 1
                self._recent.append(_summary(event, category, ts_ms / 1000))
            self._prune(minute)

    def _prune(self, minute: int) -> None:
        if len(self._counts) <= self._window + 1:
            return
        cutoff = minute - self._window
        for old in [m for m in self._counts if m <= cutoff]:
            del self._counts[old]
            self._categories.pop(old, None)

    def digest(self, now_s: float) -> Digest:
        current = int(now_s // 60)
        first = current - self._window + 1
        with self._lock:
            counts = {m: dict(c) for m, c in self._counts.items() if m >= first}
            categories: Counter[str] = Counter()
            for minute, by_category in self._categories.items():
                if minute >= first:
                    categories.update(by_category)
            recent = [b for b in self._recent if b.ts_s >= first * 60]
        minutes = [(m * 60, counts.get(m, {})) for m in range(first, current + 1)]
        totals: Counter[str] = Counter()
        for _, by_type in minutes:
            totals.update(by_type)
        return Digest(minutes, dict(totals), dict(categories.most_common()), recent[::-1])


def _summary(event: dict[str, object], category: str, ts_s: float) -> RecentBounce:
    smtp = event.get("smtp")
    reply = ""
    if isinstance(smtp, dict):
        reply = " ".join(str(smtp.get(k) or "") for k in ("code", "enhanced", "text")).strip()
    elif event.get("detail"):
        reply = str(event["detail"])
    recipient = str(event.get("recipient") or "")
    return RecentBounce(
        ts_s=ts_s,
        domain=recipient.rpartition("@")[2],
        category=category,
        reply=reply[:200],
        pool=str(event.get("pool") or ""),
    )
