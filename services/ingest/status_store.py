"""The message status view's storage: every event of recent messages, on disk (SQLite).

A bulk sender's status history does not fit in memory: three days of events at 1,000
recipients a second is hundreds of millions of records. So each ingest replica keeps its
view in a SQLite file — resident memory stays flat (SQLite's page cache is bounded), the
disk holds the history.

Each event is stored under its Kafka position (partition, offset): applying a record twice is
a no-op, and the file keeps, per partition, the next offset to read in the same transaction as
the events, so a replica that restarts with its file reads on from there instead of from the
start of the window. The file is a cache of `mail.events`: delete it and the replica rebuilds
it from the topic. If the topic no longer matches the file (a partition's end is behind what
the file has read: the topic was recreated), the file is emptied and rebuilt.

Writes come from the follower's thread and are committed in batches (`flush`); reads come from
request handlers through a second connection (WAL: readers never wait for the writer).
"""

import logging
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: Write batches are committed at least this often, and whenever the follower is idle.
COMMIT_EVERY = 2000
#: SQLite page cache per connection, in KiB (negative PRAGMA cache_size = KiB).
CACHE_KIB = 8192
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (partition, offset)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_by_message ON events (message_id);
CREATE TABLE IF NOT EXISTS messages (
    message_id TEXT PRIMARY KEY,
    first_seen_s REAL NOT NULL,
    events INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_by_age ON messages (first_seen_s);
CREATE TABLE IF NOT EXISTS positions (
    partition INTEGER PRIMARY KEY,
    next_offset INTEGER NOT NULL
);
"""


class StatusStore:
    def __init__(self, path: Path, window_s: float, max_events: int) -> None:
        self.path = path
        self._window_s = window_s
        self._max_events = max_events
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = self._connect()
        self._reader = self._connect()
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._pending = 0
        self._events = self._count()
        self._positions_pending: dict[int, int] = {}
        self._last_evict_s = 0.0

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        # A cache of the topic: a power cut may lose the last commits; they are read again.
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise RuntimeError(
                f"{self.path}: status file of schema version {version}, expected "
                f"{SCHEMA_VERSION}: delete it and the view is rebuilt from mail.events"
            )
        connection.executescript(_SCHEMA)
        connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return connection

    def _count(self) -> int:
        row = self._writer.execute("SELECT COALESCE(SUM(events), 0) FROM messages").fetchone()
        return int(row[0])

    @property
    def event_count(self) -> int:
        return self._events

    def positions(self) -> dict[int, int]:
        """partition → the next offset to read, as of the last commit."""
        with self._write_lock:
            rows = self._writer.execute("SELECT partition, next_offset FROM positions")
            return {int(p): int(o) for p, o in rows}

    def reset(self, reason: str) -> None:
        """Forget everything (the topic was recreated): the view is rebuilt from the topic."""
        log.warning("status file emptied", extra={"path": str(self.path), "reason": reason})
        with self._write_lock:
            if self._writer.in_transaction:
                self._writer.execute("ROLLBACK")
            for table in ("events", "messages", "positions"):
                self._writer.execute(f"DELETE FROM {table}")  # noqa: S608 (fixed names)
            self._pending = 0
            self._events = 0
            self._positions_pending.clear()

    def add(self, partition: int, offset: int, message_id: str, body: bytes, ts_s: float) -> None:
        """Record one event (raw `DeliveryEvent` JSON); committed by `flush` or every
        `COMMIT_EVERY` events."""
        with self._write_lock:
            if not self._writer.in_transaction:
                self._writer.execute("BEGIN")
            inserted = self._writer.execute(
                "INSERT OR IGNORE INTO events (partition, offset, message_id, body) "
                "VALUES (?, ?, ?, ?)",
                (partition, offset, message_id, body),
            ).rowcount
            if inserted:
                self._writer.execute(
                    "INSERT INTO messages (message_id, first_seen_s, events) VALUES (?, ?, 1) "
                    "ON CONFLICT (message_id) DO UPDATE SET events = events + 1",
                    (message_id, ts_s),
                )
                self._events += 1
            self._positions_pending[partition] = offset + 1
            self._pending += 1
            if self._pending >= COMMIT_EVERY:
                self._commit()

    def flush(self) -> None:
        """Commit what was added (the follower calls this after every batch it read)."""
        with self._write_lock:
            if self._pending:
                self._commit()
            now_s = time.time()
            if now_s - self._last_evict_s >= 10.0 or self._events > self._max_events:
                self._last_evict_s = now_s
                self._evict(now_s)

    def _commit(self) -> None:
        self._writer.executemany(
            "INSERT INTO positions (partition, next_offset) VALUES (?, ?) "
            "ON CONFLICT (partition) DO UPDATE SET next_offset = excluded.next_offset",
            list(self._positions_pending.items()),
        )
        self._writer.execute("COMMIT")
        self._positions_pending.clear()
        self._pending = 0

    def _evict(self, now_s: float) -> None:
        """Drop messages first seen before the window, then the oldest past `max_events`."""
        cutoff = now_s - self._window_s
        self._writer.execute("BEGIN")
        old = self._writer.execute(
            "SELECT message_id, events FROM messages WHERE first_seen_s < ?", (cutoff,)
        ).fetchall()
        excess = self._events - sum(int(n) for _, n in old) - self._max_events
        if excess > 0:
            for message_id, events in self._writer.execute(
                "SELECT message_id, events FROM messages WHERE first_seen_s >= ? "
                "ORDER BY first_seen_s",
                (cutoff,),
            ):
                old.append((message_id, events))
                excess -= int(events)
                if excess <= 0:
                    break
        for message_id, events in old:
            self._writer.execute("DELETE FROM events WHERE message_id = ?", (message_id,))
            self._writer.execute("DELETE FROM messages WHERE message_id = ?", (message_id,))
            self._events -= int(events)
        self._writer.execute("COMMIT")

    def events(self, message_id: str) -> list[bytes]:
        """A message's events in log order (one message's events share a partition)."""
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT body FROM events WHERE message_id = ? ORDER BY partition, offset",
                (message_id,),
            ).fetchall()
        return [bytes(body) for (body,) in rows]

    def close(self) -> None:
        with self._write_lock:
            if self._pending:
                self._commit()
            self._writer.close()
        with self._read_lock:
            self._reader.close()
