"""The outbox's SQLite file: its schema, opening it with its checks, and reading what a
damaged one still holds.

Opening: WAL journal, synchronous=FULL (a put() of a "new" or "end" that returned has
reached the disk; alerts are rare, so that fsync is affordable; updates, acks and touches
commit with NORMAL: outbox.py), the WAL capped (checkpoint
every WAL_PAGES, truncated to WAL_BYTES) so it cannot fill a small state partition,
then `PRAGMA quick_check`.

Salvage: a damaged page ends a table scan, so the scan seeks past it (doubling the jump,
then bisecting back to the first readable id) and carries on: one lost page
loses its own rows only.  The row count the outbox stamps into the header
(user_version, page 1) says how many rows there were, even when SQLite will not
read the file any more (truncated): then it comes straight from the header bytes.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

WAL_PAGES = 16              # ~64 KB of WAL between checkpoints
WAL_BYTES = 64 * 1024       # what a checkpointed WAL is truncated to

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    kind    TEXT    NOT NULL,
    created REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_kind ON outbox (kind, id);
CREATE TABLE IF NOT EXISTS open_alerts (
    id      TEXT    PRIMARY KEY,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    last_ts REAL
);
"""


class OutboxError(Exception):
    """The outbox cannot be created or written at all: the agent must not start."""


class _Damaged(Exception):
    """quick_check found the file damaged."""


def damaged(e: BaseException) -> bool:
    if isinstance(e, _Damaged):
        return True
    return getattr(e, "sqlite_errorname", "").startswith(    # Python >= 3.11
        ("SQLITE_CORRUPT", "SQLITE_NOTADB")) \
        or "malformed" in str(e) or "not a database" in str(e)


def unwritable(e: BaseException) -> bool:
    return getattr(e, "sqlite_errorname", "").startswith(
        ("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")) \
        or "readonly" in str(e) or "unable to open" in str(e)


def connect(path: Path) -> sqlite3.Connection:
    """The file opened, its schema in place and checked; _Damaged when the check fails."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
        db.execute(f"PRAGMA journal_size_limit={WAL_BYTES}")
        db.executescript(_SCHEMA)
        problems = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise _Damaged("; ".join(problems[:3]))
    except BaseException:
        db.close()
        raise
    return db


def salvage(path: Path) -> tuple[list[tuple], list[tuple], int | None]:
    """(outbox rows, open_alerts rows, the row count stamped in the header) that can
    still be read from a damaged file."""
    rows: list[tuple] = []
    opened: list[tuple] = []
    stamped = None
    try:
        db = sqlite3.connect(path)
    except sqlite3.Error:
        return rows, opened, _header_stamp(path)
    try:
        try:
            stamped = db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error:
            stamped = _header_stamp(path)
        rows = _scan(db)
        try:
            opened = db.execute("SELECT id, topic, payload, last_ts FROM open_alerts").fetchall()
        except sqlite3.Error:
            pass
    finally:
        db.close()
    return rows, opened, stamped


def _scan(db: sqlite3.Connection) -> list[tuple]:
    """Every readable outbox row, in id order."""
    def first_after(v: int):
        try:
            return db.execute("SELECT id FROM outbox WHERE id > ? ORDER BY id LIMIT 1",
                              (v,)).fetchone() or ()
        except sqlite3.Error:
            return None
    rows, v = [], 0
    while True:
        try:
            for r in db.execute("SELECT id, topic, payload, kind FROM outbox WHERE id > ? "
                                "ORDER BY id", (v,)):
                rows.append(r)
                v = r[0]
            return rows
        except sqlite3.Error:
            pass
        lo, hi = 0, 1
        while first_after(v + hi) is None:
            if hi > 2 ** 62:
                return rows
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if first_after(v + mid) is None else (lo, mid)
        if first_after(v + hi) == ():
            return rows
        v += hi


def _header_stamp(path: Path) -> int | None:
    """user_version straight from the file header, for a file SQLite will not read."""
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except OSError:
        return None
    if len(head) < 100 or not head.startswith(b"SQLite format 3\0"):
        return None
    return int.from_bytes(head[60:64], "big")
