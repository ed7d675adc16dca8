"""The status page (`/ui`) as one self-contained HTML document: no script, no external file.

Server-rendered, refreshed by the browser every `REFRESH_S`: the destination table, the
last hour's throughput as an inline SVG chart, bounces by category and the latest bounces,
and the controls in force.
"""

from datetime import UTC, datetime
from html import escape

from schemas.records import ControlCommand
from services.ops import table
from services.ops.digest import SERIES, Digest

REFRESH_S = 10
CHART_W, CHART_H, PAD = 720, 200, 36
COLOURS = {"delivered": "#2e7d32", "deferred": "#ef6c00", "bounced": "#c62828"}

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; } th, td { padding: 3px 9px; text-align: left; }
th { background: #eee; } tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.state-paused { color: #c62828; font-weight: bold; } .state-stale { color: #999; }
.muted { color: #777; } svg text { font-size: 11px; fill: #555; }
"""


def _cell(value: object, css: str = "") -> str:
    attr = f' class="{css}"' if css else ""
    return f"<td{attr}>{escape(str(value))}</td>"


def destinations(rows: list[table.QueueRow]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in table.COLUMNS)
    body = []
    for row in rows:
        cells = table.cells(row)
        state = row.state.split()[0]
        tds = [
            _cell(cells[0]),
            _cell(cells[1]),
            _cell(cells[2], f"state-{state}"),
            *(_cell(c, "num") for c in cells[3:11]),
            _cell(cells[11]),
        ]
        title = f"paused until {row.paused_until}: {row.pause_reason}" if row.paused_until else ""
        body.append(
            f'<tr data-pool="{escape(row.pool)}" data-destination="{escape(row.destination)}"'
            f' title="{escape(title)}">{"".join(tds)}</tr>'
        )
    if not body:
        body.append(
            f'<tr><td colspan="{len(table.COLUMNS)}" class="muted">'
            "no destination reported by any sender yet</td></tr>"
        )
    return (
        f'<table id="destinations"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def chart(digest: Digest) -> str:
    """Per-minute delivered, deferred and bounced over the window, as polylines."""
    minutes = digest.minutes
    peak = max([1, *(counts.get(s, 0) for _, counts in minutes for s in SERIES)])
    width, height = CHART_W - 2 * PAD, CHART_H - 2 * PAD
    step = width / max(1, len(minutes) - 1)

    def point(index: int, value: int) -> str:
        return f"{PAD + index * step:.1f},{PAD + height - value / peak * height:.1f}"

    lines = []
    for series in SERIES:
        points = " ".join(point(i, c.get(series, 0)) for i, (_, c) in enumerate(minutes))
        lines.append(
            f'<polyline data-series="{series}" fill="none" stroke="{COLOURS[series]}"'
            f' stroke-width="2" points="{points}"/>'
        )
    start = _clock(minutes[0][0]) if minutes else ""
    legend = "".join(
        f'<text x="{PAD + 110 * i}" y="{CHART_H - 6}" style="fill:{COLOURS[s]}">'
        f"{s}: {digest.totals.get(s, 0)}</text>"
        for i, s in enumerate(SERIES)
    )
    return (
        f'<svg id="throughput" role="img" width="{CHART_W}" height="{CHART_H}"'
        f' viewBox="0 0 {CHART_W} {CHART_H}" aria-label="recipients per minute, last hour">'
        f'<rect x="{PAD}" y="{PAD}" width="{width}" height="{height}" fill="#fcfcfc"'
        ' stroke="#ccc"/>'
        f'<text x="{PAD}" y="{PAD - 8}">{peak}/min</text>'
        f'<text x="{PAD}" y="{PAD + height + 14}">{start}</text>'
        f'<text x="{PAD + width - 30}" y="{PAD + height + 14}">now</text>'
        f"{''.join(lines)}{legend}</svg>"
    )


def bounces(digest: Digest) -> str:
    rows = (
        "".join(
            f"<tr>{_cell(category)}{_cell(count, 'num')}</tr>"
            for category, count in digest.bounces_by_category.items()
        )
        or '<tr><td colspan="2" class="muted">no bounces in the last hour</td></tr>'
    )
    recent = "".join(
        f"<tr>{_cell(_clock(b.ts_s))}{_cell(b.pool)}{_cell(b.domain)}{_cell(b.category)}"
        f"{_cell(b.reply)}</tr>"
        for b in digest.recent_bounces
    )
    return (
        '<table id="bounces"><thead><tr><th>category</th><th>last hour</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>"
        '<h3>Latest bounces</h3><table id="recent-bounces"><thead><tr><th>time</th>'
        "<th>pool</th><th>domain</th><th>category</th><th>reply</th></tr></thead>"
        f"<tbody>{recent}</tbody></table>"
    )


def controls(commands: dict[str, ControlCommand]) -> str:
    rows = (
        "".join(
            f"<tr>{_cell(key)}{_cell(c.action.value)}"
            f"{_cell(_detail(c))}{_cell(_until(c))}{_cell(c.reason or '')}</tr>"
            for key, c in sorted(commands.items())
        )
        or '<tr><td colspan="5" class="muted">none</td></tr>'
    )
    return (
        '<table id="controls"><thead><tr><th>key</th><th>action</th><th>detail</th>'
        f"<th>until</th><th>reason</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _detail(command: ControlCommand) -> str:
    if command.messages_per_s is not None:
        return f"{command.messages_per_s:g}/s"
    return f"to {command.to_pool}" if command.to_pool else ""


def _until(command: ControlCommand) -> str:
    if command.expires_at is None:
        return "removed"
    return command.expires_at.strftime("%Y-%m-%d %H:%M:%SZ")


def _clock(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%H:%M")


def render(
    rows: list[table.QueueRow],
    digest: Digest | None,
    commands: dict[str, ControlCommand],
    now: datetime,
) -> str:
    if digest is None:
        traffic = '<p class="muted">loading the last hour of mail.events…</p>'
    else:
        traffic = (
            f"{chart(digest)}<p>Last hour: "
            + ", ".join(f"{k} {v}" for k, v in sorted(digest.totals.items()))
            + f"</p><h2>Bounces by category</h2>{bounces(digest)}"
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{REFRESH_S}">'
        f"<title>Mailrail status</title><style>{_STYLE}</style></head><body>"
        "<h1>Mailrail status</h1>"
        f'<p class="muted">{now.strftime("%Y-%m-%d %H:%M:%SZ")}; refreshes every'
        f" {REFRESH_S} s. Queue = batches in progress + held in delay topics; backlog ="
        " unread batches of the destination's outbound partition (shared).</p>"
        f"<h2>Destinations</h2>{destinations(rows)}"
        f"<h2>Throughput (recipients per minute)</h2>{traffic}"
        f"<h2>Controls in force</h2>{controls(commands)}"
        "</body></html>"
    )
