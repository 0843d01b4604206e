"""Durable, ordered, bounded queue of outgoing alert messages (SQLite, WAL mode).

An alert is written here before it is published and deleted only when the
broker has acknowledged it, so broker outages and agent restarts lose nothing.
Row ids come from AUTOINCREMENT: they never go backwards, even after the table
empties, which is what lets the sender deliver strictly in id order.

Full-queue policy (max_rows): the oldest "update" is evicted to make room;
"new" and "end" events are never evicted, because they open and close an
alert and a consumer cannot reconstruct them.  When only new/end rows remain,
the incoming event is refused.  Both cases count in metrics.dropped["outbox_full"].
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    kind    TEXT    NOT NULL,
    created REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_kind ON outbox (kind, id);
"""


class Outbox:
    def __init__(self, path: str | Path, max_rows: int = 10000, metrics=None) -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        self.metrics = metrics
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as e:
            # A damaged file must not keep the agent from starting: keep it for
            # inspection and begin a fresh queue.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("outbox %s is unreadable (%s); moved it to %s and started empty",
                      self.path, e, aside)
            self._count_drop("outbox_corrupt")
            self.path.rename(aside)
            for suffix in ("-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            self._db = self._open()
        self._depth = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        self._full_logged = -1e9

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a put() that returned has reached the disk (alerts are rare, so
            # the fsync per alert is affordable).
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _count_drop(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.dropped[reason] += 1

    def put(self, topic: str, payload: bytes, kind: str) -> int | None:
        """Store one message; returns its row id, or None when it was refused."""
        with self._lock:
            evicted = False
            try:
                self._db.execute("BEGIN IMMEDIATE")
                if self._depth >= self.max_rows:
                    row = self._db.execute(
                        "SELECT id FROM outbox WHERE kind = 'update' ORDER BY id LIMIT 1").fetchone()
                    if row is None:
                        self._db.execute("ROLLBACK")
                        self._full(f"all rows are new/end events: refused this {kind!r} event")
                        return None
                    self._db.execute("DELETE FROM outbox WHERE id = ?", row)
                    evicted = True
                cur = self._db.execute(
                    "INSERT INTO outbox (topic, payload, kind, created) VALUES (?, ?, ?, ?)",
                    (topic, payload, kind, time.time()))
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                log.error("outbox write failed (%s); %r event not stored", e, kind)
                self._count_drop("outbox_error")
                return None
            if evicted:
                self._full("evicted the oldest 'update' event")
            else:
                self._depth += 1
            return cur.lastrowid

    def _full(self, what: str) -> None:
        self._count_drop("outbox_full")
        now = time.monotonic()
        if now - self._full_logged > 60:     # one line a minute; the counter has the rest
            self._full_logged = now
            log.error("outbox full (%d rows): %s; counted in dropped.outbox_full",
                      self._depth, what)

    def pending(self, limit: int, after: int = 0) -> list[tuple[int, str, bytes]]:
        """Oldest undelivered rows with id > after, in id order."""
        with self._lock:
            return self._db.execute(
                "SELECT id, topic, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit)).fetchall()

    def ack(self, rowid: int) -> None:
        """The broker has the message: forget it (a row already evicted is fine)."""
        with self._lock:
            cur = self._db.execute("DELETE FROM outbox WHERE id = ?", (rowid,))
            self._depth -= cur.rowcount

    def depth(self) -> int:
        return self._depth

    def journal_mode(self) -> str:
        with self._lock:
            return self._db.execute("PRAGMA journal_mode").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
