"""The table `make chaos` prints, and the JSON it keeps under chaos/run/."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from chaos.oracle import Verdict
from chaos.stack import RUN_DIR

COLUMNS = (
    ("#", 3),
    ("scenario", 34),
    ("accepted", 8),
    ("final", 7),
    ("lost", 5),
    ("wrong", 5),
    ("dup@sink", 8),
    ("flagged", 7),
    ("extra ev", 8),
    ("recover s", 9),
    ("took s", 6),
    ("result", 6),
)


def _row(verdict: Verdict) -> list[str]:
    recover = "-" if verdict.recover_s is None else f"{verdict.recover_s:.1f}"
    return [
        verdict.scenario,
        verdict.title,
        str(verdict.accepted),
        str(verdict.final),
        str(verdict.lost),
        str(verdict.wrong),
        str(verdict.dup_sink),
        str(verdict.flagged),
        str(verdict.extra_events),
        recover,
        f"{verdict.elapsed_s:.0f}",
        "PASS" if verdict.ok else ("ERROR" if verdict.error else "FAIL"),
    ]


def table(verdicts: Sequence[Verdict]) -> str:
    def line(cells: Sequence[str]) -> str:
        parts = []
        for (_, width), cell in zip(COLUMNS, cells, strict=True):
            cell = cell if len(cell) <= width else cell[: width - 1] + "…"
            parts.append(cell.ljust(width) if width > 9 else cell.rjust(width))
        return " | ".join(parts)

    out = [line([name for name, _ in COLUMNS]), "-+-".join("-" * w for _, w in COLUMNS)]
    out += [line(_row(v)) for v in verdicts]
    failed = [v for v in verdicts if not v.ok]
    for verdict in failed:
        out.append("")
        out.append(verdict.summary())
    notes = [(v.scenario, n) for v in verdicts if v.ok for n in v.notes]
    if notes:
        out.append("")
        out += [f"{number:>3}: {note}" for number, note in notes]
    return "\n".join(out)


def write_results(verdicts: Sequence[Verdict], *, small: bool) -> Path:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    path = RUN_DIR / f"results-{time.strftime('%Y%m%d-%H%M%S')}{'-small' if small else ''}.json"
    data = [asdict(v) | {"ok": v.ok} for v in verdicts]
    path.write_text(json.dumps(data, indent=2, default=str))
    return path
