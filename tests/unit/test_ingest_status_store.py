"""The status view's SQLite file: idempotent by Kafka position, resumable, bounded."""

from __future__ import annotations

import time
from pathlib import Path

from services.ingest.status_store import StatusStore


def test_events_come_back_in_log_order_and_a_record_applied_twice_counts_once(
    tmp_path: Path,
) -> None:
    store = StatusStore(tmp_path / "s.sqlite3", window_s=3600, max_events=100)
    now = time.time()
    store.add(3, 10, "m1", b"accepted", now)
    store.add(3, 11, "m2", b"other", now)
    store.add(3, 12, "m1", b"delivered", now)
    store.add(3, 12, "m1", b"delivered", now)  # the same record read again
    store.flush()
    assert store.events("m1") == [b"accepted", b"delivered"]
    assert store.event_count == 3 and store.positions() == {3: 13}
    store.close()


def test_a_reopened_file_keeps_its_events_and_where_it_stopped(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = StatusStore(path, window_s=3600, max_events=100)
    store.add(0, 5, "m1", b"a", time.time())
    store.add(1, 7, "m2", b"b", time.time())
    store.add(1, 8, "m3", b"c", time.time())
    store.flush()
    store.add(1, 9, "m4", b"d", time.time())
    store.close()  # commits what was added since the last flush
    again = StatusStore(path, window_s=3600, max_events=100)
    assert again.positions() == {0: 6, 1: 10}
    assert again.events("m2") == [b"b"] and again.event_count == 4
    again.reset("topic recreated")
    assert again.positions() == {} and again.events("m2") == [] and again.event_count == 0
    again.close()


def test_messages_leave_after_the_window_and_the_oldest_first_past_the_bound(
    tmp_path: Path,
) -> None:
    store = StatusStore(tmp_path / "s.sqlite3", window_s=60, max_events=4)
    now = time.time()
    store.add(0, 0, "old", b"x", now - 120)
    store.add(0, 1, "old", b"y", now - 119)
    for offset, message in enumerate(["a", "b", "c", "d", "e"], start=2):
        store.add(0, offset, message, b"z", now - 10 + offset)
    store.flush()
    assert store.events("old") == []  # first seen before the window
    assert store.events("a") == []  # the oldest of the rest, past four events
    assert [m for m in "bcde" if store.events(m)] == list("bcde")
    assert store.event_count == 4
    store.close()
