"""Reading what a damaged outbox file still holds.

A damaged page ends a table scan, so the scan seeks past it (doubling the jump,
then bisecting back to the first readable id) and carries on: one lost page
loses its own rows only.  The row count the outbox stamps into the header
(user_version, page 1) says how many rows there were, even when SQLite will not
read the file any more (truncated): then it comes straight from the header bytes.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path


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
