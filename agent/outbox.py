"""Durable, ordered, bounded queue of outgoing alert messages (SQLite, WAL mode).

An alert is written here before it is published and deleted only when the broker has
acknowledged it, so broker outages and agent restarts lose nothing.  "new" and "end"
reach the disk before put() returns; an "update", an ack and touch() are committed
without waiting for it (they survive a kill; a power cut at worst loses an update or
sends an acked row again): an alert open for weeks cost 3,660 fsyncs an hour on an SD
card (RESULTS, 21st session).  Row ids never go backwards (the file keeps the
high-water mark): the sender delivers strictly in id order.

Full-queue policy (max_rows): the oldest "update" is evicted to make room; "new" and
"end" events are never evicted: they open and close an alert, and a consumer cannot
reconstruct them.  Each open alert keeps a row for its end, so when only new/end rows
remain an incoming event is refused, but never the end of an alert whose new was taken.
Both cases count in metrics.dropped["outbox_full"].

A failing disk (full, I/O error, read-only) loses nothing while the process lives: an
event the file refuses is kept in memory, and so is every later one until retry()
writes them back, so the order stays "file rows, then memory rows"; pending() returns
both.  Memory holds at most memory_rows: past that the oldest "update" goes, else the
oldest event (the newest new/end stay).  state()["ok"] is false meanwhile.

Damage (`PRAGMA quick_check` at open, or corruption reported later): the rows that can
still be read are saved, the file is moved aside (`<name>.corrupt-<ms>`) and a fresh one
gets them plus what is in memory.  A transaction that changes the row count stamps it
into the header (user_version), so the loss is counted even when the table's pages are
gone.  Open alerts (new/update seen, no end yet) live in the open_alerts table, with
their event and last sample time (touch()): after a kill -9 the next run finds them in
left_open().  The WAL is capped (outbox_file.py).  A file or folder that cannot be
created or written at start raises OutboxError.  Every loss counts in
metrics.dropped[reason] (outbox_full, outbox_corrupt, outbox_memory_full,
outbox_unsaved) and is logged, at most one line per LOG_EVERY_S, with counts."""
from __future__ import annotations

import errno
import logging
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

from .outbox_file import OutboxError, _Damaged, connect, damaged, salvage, unwritable

log = logging.getLogger(__name__)

RETRY_S = 2.0               # how often a failed disk is tried again
LOG_EVERY_S = 60.0          # loss log lines, at most one per this
_FAILED = object()          # a disk operation failed (and was handled)

class Outbox:
    def __init__(self, path: str | Path, max_rows: int = 10000, metrics=None,
                 memory_rows: int = 1000) -> None:
        self.path = Path(path)
        self.max_rows, self.memory_rows, self.metrics = max_rows, memory_rows, metrics
        self._lock = threading.RLock()
        self._mem: dict[int, tuple[str, bytes, str]] = {}      # id -> row, ids ascending
        self._open: dict[str, tuple[str, bytes, float | None]] = {}   # alert id -> event
        self._undeleted: set[int] = set()     # acknowledged, but the delete failed
        self._last_id, self._depth = 0, 0     # the newest id; rows in the file
        self._error: str | None = None
        self._retry_at, self.lost = 0.0, 0
        self._losses: Counter = Counter()
        self._loss_what, self._loss_logged = "", -1e9
        self._db: sqlite3.Connection | None = None
        self._loaded = False                  # the previous run's open alerts were read
        if str(path) != ":memory:":
            self._prepare()
        with self._lock:
            self._db = self._open_db(starting=True)
            self._left_open = [(a, *ev) for a, ev in self._open.items()]

    # ------------------------------------------------------------ open, damage
    def _prepare(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab"):
                pass
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise OutboxError(f"state_dir {self.path.parent} is not writable: "
                                  f"{e.strerror or e}") from None

    def _connect(self) -> sqlite3.Connection:
        db = connect(self.path)
        try:
            self._depth = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            self._last_id = max(self._last_id, seq[0] if seq else 0)
            if not self._loaded:     # later, memory knows better than the file
                self._adopt(db.execute("SELECT id, topic, payload, last_ts FROM open_alerts"))
        except BaseException:
            db.close()
            raise
        return db

    def _open_db(self, starting: bool = False,
                 fresh: bool = False) -> sqlite3.Connection | None:
        """The checked file (a damaged one replaced), or None when the disk fails.
        `fresh`: the file was just created; damaged again means the disk is failing."""
        try:
            self._db = self._connect()
        except (sqlite3.Error, _Damaged) as e:
            if damaged(e) and not fresh:
                try:
                    return self._replace(str(e))
                except OSError as moved:
                    if starting:
                        raise OutboxError(f"outbox {self.path} is damaged ({e}) and cannot be "
                                          f"moved aside: {moved}") from None
                    return self._disk_failed(f"cannot move the damaged outbox aside: {moved}")
            if starting and unwritable(e):
                raise OutboxError(f"state_dir {self.path.parent} is not writable: {e}") from None
            return self._disk_failed(f"cannot open {self.path}: {e}")
        if self._mem or self._undeleted:
            self._flush()
        return self._db

    def _replace(self, why: str) -> sqlite3.Connection | None:
        """Save what the damaged file still holds, move it aside, start a fresh one."""
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None
        rows, opened, stamped = salvage(self.path)
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time() * 1000)}")
        self.path.rename(aside)
        wal = Path(f"{self.path}-wal")
        if wal.exists():
            wal.rename(f"{aside}-wal")
        Path(f"{self.path}-shm").unlink(missing_ok=True)
        rows = [r for r in rows if r[0] not in self._undeleted]
        unknown = stamped is None and self._depth == 0
        lost = max(0, max(self._depth - len(self._undeleted), stamped or 0) - len(rows))
        self._undeleted.clear()
        self._depth = 0
        log.error("outbox %s is damaged (%s): saved %d rows, lost %s; moved it to %s and "
                  "started a fresh one%s", self.path, why, len(rows),
                  "an unknown number (the header is unreadable)" if unknown else lost, aside,
                  "; counted in dropped.outbox_corrupt" if lost else "")
        self._loss("outbox_corrupt", lost, logged=True)
        for rid, topic, payload, kind in rows:
            self._mem[rid] = (topic, payload, kind)
            self._last_id = max(self._last_id, rid)
        self._mem = dict(sorted(self._mem.items()))
        if not self._loaded:
            self._adopt(opened)
        return self._open_db(fresh=True)

    def _adopt(self, opened) -> None:
        for aid, topic, payload, ts in opened:
            self._open[aid] = (topic, payload, ts)
        self._loaded = True

    # ------------------------------------------------------------ writes
    def _txn(self, work, durable: bool = True):
        """Run work(db) -> (result, change in row count) in one transaction that also
        stamps the row count; _FAILED when the disk failed (handled here).  Not `durable`:
        synchronous=NORMAL (module docstring)."""
        db = self._db
        try:
            db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            db.execute("BEGIN IMMEDIATE")
            result, delta = work(db)
            if delta:
                db.execute(f"PRAGMA user_version = {self._depth + delta}")
            db.execute("COMMIT")
        except sqlite3.Error as e:
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._failed(e)
            return _FAILED
        self._depth += delta
        if self._error and not self._mem and not self._undeleted:
            log.warning("outbox %s is writable again", self.path)
            self._error = None
        return result

    def _failed(self, e: sqlite3.Error) -> None:
        if damaged(e):
            try:
                self._db = self._replace(str(e))
            except OSError as moved:
                self._disk_failed(f"{e}; cannot move the damaged file aside: {moved}")
        else:
            self._disk_failed(str(e))

    def _disk_failed(self, why: str) -> None:
        """Memory mode until retry() succeeds; returns None (no usable file)."""
        if self._error is None:
            log.error("outbox %s cannot be written (%s): alert events are kept in memory (at "
                      "most %d) and published from there; retrying every %.0f s",
                      self.path, why, self.memory_rows, RETRY_S)
        self._error = why
        self._retry_at = time.monotonic() + RETRY_S
        return None

    def put(self, topic: str, payload: bytes, kind: str, alert_id: str | None = None,
            last_ts: float | None = None) -> int | None:
        """Queue one message; its id, or None when the full-queue policy refused it.  With
        alert_id, the open-alert record follows the event (removed by "end")."""
        with self._lock:
            owed = False        # an end of an alert whose new this outbox took
            if alert_id is not None:
                if kind == "end":
                    owed = self._open.pop(alert_id, None) is not None
                elif kind == "new" or alert_id in self._open:
                    self._open[alert_id] = (topic, payload, last_ts)
                else:           # an update of an alert whose new was refused: not tracked
                    alert_id = None
            if self._mem:
                self.retry()
            if not self._mem and self._db is not None:
                done = self._txn(lambda db: self._insert(db, topic, payload, kind, alert_id,
                                                         last_ts, owed), durable=kind != "update")
                if done is not _FAILED:
                    rowid, dropped = done
                    if dropped:
                        self._loss("outbox_full", 1, f"outbox full ({self._depth} rows): "
                                                     f"{dropped}")
                    if rowid is None and kind == "new":
                        self._open.pop(alert_id, None)
                    return rowid
            return self._keep(topic, payload, kind)

    def _insert(self, db, topic, payload, kind, alert_id, last_ts, owed):
        """((row id or None if refused, what the full-queue policy dropped), row delta)"""
        delta, dropped = 1, None
        # an open alert's end must go out, or it never ends downstream (RESULTS, 21st)
        if self._depth + (0 if owed else len(self._open)) >= self.max_rows:
            row = db.execute(
                "SELECT id FROM outbox WHERE kind = 'update' ORDER BY id LIMIT 1").fetchone()
            if row is not None:
                db.execute("DELETE FROM outbox WHERE id = ?", row)
                delta, dropped = 0, "evicted the oldest 'update' event"
            elif not owed:
                return (None, f"all rows are new/end events or kept for open alerts' ends: "
                              f"refused a {kind!r} event"), 0
        # ids are issued here, not by SQLite: memory rows and a replacement file share
        # one sequence (AUTOINCREMENT still keeps its high-water mark across restarts)
        rowid = self._last_id + 1
        db.execute("INSERT INTO outbox (id, topic, payload, kind, created) VALUES (?, ?, ?, ?, ?)",
                   (rowid, topic, payload, kind, time.time()))
        if alert_id is not None:
            if kind == "end":
                db.execute("DELETE FROM open_alerts WHERE id = ?", (alert_id,))
            else:
                db.execute("INSERT OR REPLACE INTO open_alerts VALUES (?, ?, ?, ?)",
                           (alert_id, topic, payload, last_ts))
        self._last_id = rowid
        return (rowid, dropped), delta

    def _keep(self, topic: str, payload: bytes, kind: str) -> int:
        if len(self._mem) >= self.memory_rows:
            victim = next((i for i, r in self._mem.items() if r[2] == "update"),
                          next(iter(self._mem)))
            gone = self._mem.pop(victim)[2]
            self._loss("outbox_memory_full", 1, f"memory full ({self.memory_rows} events, "
                                                f"disk failing): dropped a {gone!r} event")
        self._last_id += 1
        self._mem[self._last_id] = (topic, payload, kind)
        return self._last_id

    def _flush(self) -> None:
        """Write memory rows, open alerts and failed deletes back in one transaction."""
        def work(db):
            for rid in self._undeleted:
                db.execute("DELETE FROM outbox WHERE id = ?", (rid,))
            db.executemany("INSERT OR REPLACE INTO outbox (id, topic, payload, kind, created) "
                           "VALUES (?, ?, ?, ?, ?)",
                           [(i, t, p, k, time.time()) for i, (t, p, k) in self._mem.items()])
            db.execute("DELETE FROM open_alerts")
            db.executemany("INSERT INTO open_alerts VALUES (?, ?, ?, ?)",
                           [(a, *ev) for a, ev in self._open.items()])
            return None, db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] - self._depth
        if self._txn(work) is _FAILED:
            return
        n, self._mem, self._undeleted = len(self._mem), {}, set()
        if self._error:
            log.warning("outbox %s is writable again (%d events from memory stored)",
                        self.path, n)
            self._error = None

    def touch(self, last_ts: dict[str, float]) -> None:
        """Record the newest sample time of open alerts (call every few seconds at most)."""
        with self._lock:
            changed = {a: ts for a, ts in last_ts.items()
                       if a in self._open and self._open[a][2] != ts}
            for a, ts in changed.items():
                self._open[a] = (*self._open[a][:2], ts)
            if changed and self._db is not None and not self._mem:
                self._txn(lambda db: (db.executemany(
                    "UPDATE open_alerts SET last_ts = ? WHERE id = ?",
                    [(ts, a) for a, ts in changed.items()]), 0), durable=False)

    def left_open(self) -> list[tuple[str, str, bytes, float | None]]:
        """(alert id, topic, last event, last sample time) of those a previous run left open."""
        return list(self._left_open)

    # ------------------------------------------------------------ reads, acks
    def pending(self, limit: int, after: int = 0) -> list[tuple[int, str, bytes]]:
        """Oldest undelivered rows with id > after, in id order (disk, then memory)."""
        with self._lock:
            rows = []
            if self._db is not None:
                try:
                    rows = [r for r in self._db.execute(
                        "SELECT id, topic, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                        (after, limit + len(self._undeleted))).fetchall()
                        if r[0] not in self._undeleted]
                except sqlite3.Error as e:
                    self._failed(e)     # the next call reads the replacement, or memory
            rows += [(i, t, p) for i, (t, p, _) in self._mem.items() if i > after]
            return rows[:limit]

    def ack(self, rowid: int) -> None:
        """The broker has the message: forget it (a row already evicted is fine)."""
        with self._lock:
            if self._mem.pop(rowid, None) is not None:
                return
            self._undeleted.add(rowid)
            if self._db is None:
                return
            if self._txn(lambda db: (None, -db.execute(
                    "DELETE FROM outbox WHERE id = ?", (rowid,)).rowcount),
                    durable=False) is not _FAILED:
                self._undeleted.discard(rowid)

    def depth(self) -> int:
        return max(0, self._depth - len(self._undeleted)) + len(self._mem)

    def state(self) -> dict:
        """For health: {"ok", "error", "depth", "memory", "lost"}."""
        with self._lock:
            return {"ok": self._error is None, "error": self._error, "depth": self.depth(),
                    "memory": len(self._mem), "lost": self.lost}

    def journal_mode(self) -> str:
        with self._lock:
            return self._db.execute("PRAGMA journal_mode").fetchone()[0]

    # ------------------------------------------------------------ upkeep
    def retry(self) -> None:
        """After a disk failure, at most every RETRY_S: reopen the file, free the WAL and
        write memory back.  Also emits held-back loss counts.  Called by the sender."""
        with self._lock:
            if (self._error or self._mem or self._undeleted) \
                    and time.monotonic() >= self._retry_at:
                self._retry_at = time.monotonic() + RETRY_S
                if self._db is None:
                    self._db = self._open_db()
                if self._db is not None:
                    try:
                        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    except sqlite3.Error:
                        pass    # still failing: the flush below says so
                    self._flush()
            self._log_losses()

    def _loss(self, reason: str, n: int, what: str = "", logged: bool = False) -> None:
        if n <= 0:
            return
        self.lost += n
        if self.metrics is not None:
            self.metrics.dropped[reason] += n
        if not logged:
            self._losses[reason] += n
            self._loss_what = what
            self._log_losses()

    def _log_losses(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._losses and (force or now - self._loss_logged >= LOG_EVERY_S):
            self._loss_logged = now
            log.error("outbox dropped %s alert events (last: %s); %d lost since start",
                      ", ".join(f"{n} {r}" for r, n in self._losses.items()),
                      self._loss_what, self.lost)
            self._losses.clear()

    def close(self) -> None:
        with self._lock:
            if self._mem and self._db is not None:
                self._flush()
            self._loss("outbox_unsaved", len(self._mem),
                       f"{len(self._mem)} events only in memory at exit (disk failing: "
                       f"{self._error})")
            self._mem.clear()
            self._log_losses(force=True)
            if self._db is not None:
                try:
                    self._db.close()
                except sqlite3.Error:
                    pass
                self._db = None
