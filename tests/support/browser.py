"""Headless Chromium (Debian's `chromium`) for page tests, and a reader for the tables it shows."""

from __future__ import annotations

import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def chromium(*args: str, timeout_s: float = 90.0) -> subprocess.CompletedProcess[str]:
    """Run Chromium once with a fresh profile."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        return subprocess.run(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )


def dump_dom(url: str) -> str:
    """The page's DOM after it loaded, as Chromium serialises it."""
    result = chromium("--dump-dom", url)
    if result.returncode != 0 or "<html" not in result.stdout:
        raise RuntimeError(f"chromium failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


def screenshot(url: str, path: Path, size: str = "1400,1200") -> None:
    chromium(f"--screenshot={path}", f"--window-size={size}", url)


class _Tables(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.elements: dict[str, dict[str, str | None]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if named.get("id"):
            self.elements[named["id"] or ""] = named | {"tag": tag}
        if tag == "table":
            self._table = named.get("id") or f"table-{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def tables(dom: str) -> dict[str, list[list[str]]]:
    """Every table of the page by id: its rows (header row first) as lists of cell texts."""
    parser = _Tables()
    parser.feed(dom)
    return parser.tables


def element_ids(dom: str) -> dict[str, dict[str, str | None]]:
    parser = _Tables()
    parser.feed(dom)
    return parser.elements
