"""The destination table (`mailrail queues`, `/ui`, `GET /admin/v1/queues`), from `mail.stats`.

What the queue numbers mean: `queue` = batches the owning sender is delivering now
(`in_progress`) plus batches it put in a delay topic — held for a pause, the quota or too many
in progress, or deferred after a 4xx — and has not read back yet (`held`, an estimate).
`backlog` is the consumer lag of the outbound partition the destination is keyed to: batches
not read yet, shared by every destination on that partition (an upper bound for this one).
"""

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime

from schemas.records import DestinationStats, utc_now

#: A snapshot older than this many of its sender's intervals is stale (sender gone, or the
#: destination moved to another sender); older than `HIDE_AFTER_S` it is not shown at all.
STALE_INTERVALS = 3
HIDE_AFTER_S = 3600.0


@dataclass(frozen=True)
class QueueRow:
    pool: str
    destination: str
    state: str
    queue: int
    in_progress: int
    held: int
    backlog: int | None
    rate_per_s: float
    quota_per_s: float | None
    override_per_s: float | None
    backoff_factor: float
    connections: str
    delivered: int
    deferred: int
    bounced: int
    last_reply: str
    age_s: float
    paused_until: str | None
    pause_reason: str | None
    sender: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def state_of(stats: DestinationStats, age_s: float) -> str:
    if age_s > STALE_INTERVALS * stats.interval_s:
        return "stale"
    if stats.paused_until is not None:
        return "paused"
    if stats.backoff_factor < 1.0:
        return f"backoff x{stats.backoff_factor:.2f}"
    return "active" if stats.in_progress or stats.rate_per_s > 0 else "idle"


def last_reply(stats: DestinationStats) -> str:
    if not stats.last_replies:
        return ""
    reply = stats.last_replies[-1]
    text = " ".join(p for p in (str(reply.code), reply.enhanced or "", reply.text) if p)
    return f"{text} ({reply.mx})" if reply.mx else text


def row_of(stats: DestinationStats, now: datetime) -> QueueRow:
    age_s = max(0.0, (now - stats.ts).total_seconds())
    return QueueRow(
        pool=stats.pool,
        destination=stats.destination,
        state=state_of(stats, age_s),
        queue=stats.in_progress + stats.held,
        in_progress=stats.in_progress,
        held=stats.held,
        backlog=stats.partition_backlog,
        rate_per_s=stats.rate_per_s,
        quota_per_s=stats.quota_per_s,
        override_per_s=stats.override_per_s,
        backoff_factor=stats.backoff_factor,
        connections=f"{stats.connections_in_use}/{stats.max_connections}",
        delivered=stats.delivered,
        deferred=stats.deferred,
        bounced=stats.bounced,
        last_reply=last_reply(stats),
        age_s=round(age_s, 1),
        paused_until=None if stats.paused_until is None else _when(stats.paused_until),
        pause_reason=stats.pause_reason,
        sender=stats.sender,
    )


def rows(
    stats: Iterable[DestinationStats],
    now: datetime | None = None,
    pool: str | None = None,
    show_all: bool = False,
) -> list[QueueRow]:
    """Rows by queue size, then rate; stale ones older than an hour only with `show_all`."""
    now = now or utc_now()
    result = [
        row_of(s, now)
        for s in stats
        if (pool is None or s.pool == pool)
        and (show_all or (now - s.ts).total_seconds() < HIDE_AFTER_S)
    ]
    return sorted(result, key=lambda r: (-r.queue, -r.rate_per_s, r.pool, r.destination))


def _when(moment: datetime) -> str:
    if moment.year >= 9999:
        return "until resumed"
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


COLUMNS = (
    "POOL",
    "DESTINATION",
    "STATE",
    "QUEUE",
    "BACKLOG",
    "RATE/S",
    "QUOTA/S",
    "CONN",
    "DELIVERED",
    "DEFERRED",
    "BOUNCED",
    "LAST REPLY",
)


def cells(row: QueueRow) -> list[str]:
    quota = _rate(row.quota_per_s)
    if row.override_per_s is not None:
        quota += " (override)"
    return [
        row.pool,
        row.destination,
        row.state,
        str(row.queue),
        "-" if row.backlog is None else str(row.backlog),
        f"{row.rate_per_s:.1f}",
        quota,
        row.connections,
        str(row.delivered),
        str(row.deferred),
        str(row.bounced),
        row.last_reply[:70],
    ]


def render(table: list[QueueRow]) -> str:
    """A fixed-width text table, like `kcli top`."""
    lines = [list(COLUMNS), *(cells(r) for r in table)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    text = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]
    if not table:
        text.append("(no destination reported by any sender yet)")
    return "\n".join(text)
