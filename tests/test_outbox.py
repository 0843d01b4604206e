"""Outbox: durable SQLite queue (WAL), order, ack, bounded size policy, and what
happens when the disk fails: full (memory fallback, write-back), damaged (salvage,
move aside, counted loss), read-only (OutboxError); open alerts across a crash."""
from __future__ import annotations

import errno
import logging
import os
import random
import sqlite3
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent import outbox as outbox_mod
from agent import outbox_file
from agent.metrics import Metrics
from agent.outbox import Outbox, OutboxError

PAYLOAD = 400       # bytes: about an alert event's JSON


@contextmanager
def tiny_fs(d: Path, size: str = "256k"):
    """A small tmpfs mounted at d, for a real full disk (needs root and mount rights;
    CI runs as root on the same kind of machine)."""
    d.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs for a real full disk "
                    f"({(r.stderr or r.stdout).strip()}); needs root with mount rights")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def _take_free_pages(fh) -> None:
    try:
        while True:
            fh.write(b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC


def fill(d: Path) -> Path:
    """Take every free page of the file system at d."""
    f = d / "filler"
    with open(f, "wb", buffering=0) as fh:
        _take_free_pages(fh)
    return f


class KeepFull:
    """Another process filling the disk at d: it takes every free page, and every page
    that comes free later, until closed (then its file goes and the space is back).  A
    one-off fill() can be undone by the outbox itself: a retry truncates its WAL, and the
    pages that frees let it write again with the filler still there."""

    def __init__(self, d: Path):
        self.path = d / "filler"
        self._fh = open(self.path, "wb", buffering=0)
        self._stop = threading.Event()
        _take_free_pages(self._fh)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            _take_free_pages(self._fh)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self._fh.close()
        self.path.unlink()


def body(i: int) -> bytes:
    return f"{i:06d}".encode() + b"x" * PAYLOAD


@pytest.fixture
def quick_retry(monkeypatch):
    monkeypatch.setattr(outbox_mod, "RETRY_S", 0.0)


def test_wal_order_ack_and_depth(tmp_path):
    ob = Outbox(tmp_path / "outbox.sqlite")
    assert ob.journal_mode() == "wal"
    ids = [ob.put("t/alerts", f"p{i}".encode(), "new") for i in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert ob.depth() == 5
    assert [p for _, _, p in ob.pending(10)] == [b"p0", b"p1", b"p2", b"p3", b"p4"]
    assert [r for r, _, _ in ob.pending(2, after=ids[1])] == ids[2:4]
    ob.ack(ids[0])
    ob.ack(ids[0])              # acknowledging twice is harmless
    assert ob.depth() == 4
    for i in ids[1:]:
        ob.ack(i)
    assert ob.depth() == 0
    # ids keep growing after the queue empties, so "after the last handed id" stays valid
    assert ob.put("t/alerts", b"again", "end") > ids[-1]
    ob.close()


def test_only_new_and_end_wait_for_the_disk(tmp_path):
    """An alert open for weeks sends an update every 10 s and touches its last sample
    time: each was an fsync'd transaction (3,660 fsyncs an hour on the audit's SD-card
    count).  Now only "new" and "end" commit with synchronous=FULL; updates, acks and
    touches with NORMAL (WAL: they survive a kill, test_faults_disk.py), and all of
    them are read back after a reopen."""
    ob = Outbox(tmp_path / "outbox.sqlite")
    said = []
    ob._db.set_trace_callback(said.append)

    def sync_of(work) -> list[str]:
        said.clear()
        work()
        return [s for s in said if s.startswith("PRAGMA synchronous")]
    new = sync_of(lambda: ob.put("t/alerts", b"new", "new", alert_id="a1", last_ts=1.0))
    upd = sync_of(lambda: ob.put("t/alerts", b"upd", "update", alert_id="a1", last_ts=2.0))
    touch = sync_of(lambda: ob.touch({"a1": 3.0}))
    ack = sync_of(lambda: ob.ack(ob.pending(1)[0][0]))
    end = sync_of(lambda: ob.put("t/alerts", b"end", "end", alert_id="a2", last_ts=4.0))
    assert new == end == ["PRAGMA synchronous=FULL"]
    assert upd == touch == ack == ["PRAGMA synchronous=NORMAL"]
    ob.close()
    again = Outbox(tmp_path / "outbox.sqlite")
    assert [p for _, _, p in again.pending(10)] == [b"upd", b"end"]
    assert [(a, ts) for a, _, _, ts in again.left_open()] == [("a1", 3.0)]
    again.close()


def test_rows_survive_reopen(tmp_path):
    path = tmp_path / "state" / "outbox.sqlite"
    ob = Outbox(path)
    first = ob.put("t/alerts", b"one", "new")
    ob.put("t/alerts", b"two", "end")
    ob.ack(first)
    ob.close()
    ob = Outbox(path)
    assert ob.depth() == 1
    assert ob.pending(10)[0][1:] == ("t/alerts", b"two")
    ob.close()


def test_full_drops_oldest_update_and_never_new_or_end(tmp_path):
    m = Metrics()
    ob = Outbox(tmp_path / "outbox.sqlite", max_rows=4, metrics=m)
    a = ob.put("t", b"new-1", "new")
    u1 = ob.put("t", b"upd-1", "update")
    u2 = ob.put("t", b"upd-2", "update")
    e = ob.put("t", b"end-1", "end")
    assert ob.depth() == 4

    u3 = ob.put("t", b"upd-3", "update")          # evicts upd-1, the oldest update
    assert [r for r, _, _ in ob.pending(10)] == [a, u2, e, u3]
    assert m.dropped["outbox_full"] == 1

    n2 = ob.put("t", b"new-2", "new")             # evicts upd-2
    n3 = ob.put("t", b"new-3", "new")             # evicts upd-3
    assert [r for r, _, _ in ob.pending(10)] == [a, e, n2, n3]
    assert m.dropped["outbox_full"] == 3

    # only new/end left: the incoming event is refused, nothing already queued is lost
    assert ob.put("t", b"end-2", "end") is None
    assert ob.put("t", b"upd-4", "update") is None
    assert [p for _, _, p in ob.pending(10)] == [b"new-1", b"end-1", b"new-2", b"new-3"]
    assert ob.depth() == 4
    assert m.dropped["outbox_full"] == 5
    assert ob.state()["lost"] == 5
    assert u1 not in [r for r, _, _ in ob.pending(10)]
    ob.close()


def test_an_open_alert_s_end_is_never_refused(tmp_path):
    """A long outage fills the outbox with new/end events.  Before, the end of an alert
    whose new was taken could be refused (and its restart end too): downstream the alert
    never ended.  Each open alert now keeps a row for its end: a new is refused first, and
    an owed end is taken even past max_rows (a previous run's, found open at start)."""
    m = Metrics()
    ob = Outbox(tmp_path / "outbox.sqlite", max_rows=4, metrics=m)
    assert ob.put("t", b"new-a", "new", alert_id="a") is not None
    assert ob.put("t", b"new-b", "new", alert_id="b") is not None
    # 2 rows + 2 open alerts' ends: full for anything but those ends
    assert ob.put("t", b"new-c", "new", alert_id="c") is None
    assert ob.put("t", b"upd-c", "update", alert_id="c") is None   # c is not open here
    assert ob.put("t", b"upd-a", "update", alert_id="a") is None
    assert ob.put("t", b"end-c", "end", alert_id="c") is None      # never taken: not owed
    assert ob.put("t", b"end-a", "end", alert_id="a") is not None
    assert ob.put("t", b"end-b", "end", alert_id="b") is not None
    assert [p for _, _, p in ob.pending(10)] == [b"new-a", b"new-b", b"end-a", b"end-b"]
    assert m.dropped["outbox_full"] == 4
    ob.close()
    # an alert a previous run left open, in a file the next run's cap finds full: its
    # restart end goes past the cap
    path = tmp_path / "left.sqlite"
    ob = Outbox(path, max_rows=3, metrics=m)
    ob.put("t", b"new-e", "new", alert_id="e")
    ob.put("t", b"x", "new")
    ob.close()
    ob = Outbox(path, max_rows=2, metrics=m)
    assert [a for a, *_ in ob.left_open()] == ["e"]
    assert ob.put("t", b"end-e", "end", alert_id="e") is not None
    assert [p for _, _, p in ob.pending(10)] == [b"new-e", b"x", b"end-e"]
    ob.close()


def test_concurrent_put_and_ack(tmp_path):
    ob = Outbox(tmp_path / "outbox.sqlite")
    acked = []

    def producer(k):
        for i in range(25):
            ob.put("t", f"{k}-{i}".encode(), "update")

    def consumer():
        while len(acked) < 50:
            for rowid, _, _ in ob.pending(10):
                if rowid not in acked:
                    ob.ack(rowid)
                    acked.append(rowid)

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(4)]
    c = threading.Thread(target=consumer)
    for t in threads + [c]:
        t.start()
    for t in threads + [c]:
        t.join(60)
    assert len(acked) == len(set(acked)) >= 50
    assert ob.depth() == 100 - len(acked) == len(ob.pending(1000))
    ob.close()


def test_wal_is_capped_and_checkpointed(tmp_path):
    # SQLite's default (checkpoint at 1000 pages, never truncate) lets the WAL reach
    # ~4 MB under this load: more than a small state partition holds.
    path = tmp_path / "outbox.sqlite"
    ob = Outbox(path)
    wal, ids, biggest = Path(f"{path}-wal"), [], 0
    for i in range(600):
        ids.append(ob.put("t", body(i), "update" if i % 3 else "new"))
        if i % 2:
            ob.ack(ids.pop(0))
        biggest = max(biggest, wal.stat().st_size)
    assert biggest <= 2 * outbox_file.WAL_BYTES, biggest
    assert ob.depth() == len(ids) == 300
    ob.close()


# ---------------------------------------------------------------- full disk
def test_full_disk_keeps_events_in_memory_and_writes_them_back(tmp_path, quick_retry, caplog):
    caplog.set_level(logging.WARNING)
    m = Metrics()
    with tiny_fs(tmp_path / "fs") as d:
        path = d / "outbox.sqlite"
        ob = Outbox(path, metrics=m)
        before = [ob.put("t", body(i), "new") for i in range(2)]
        filler = fill(d)
        kinds = ["new", "update", "update", "end"] * 15
        ids = [ob.put("t", body(i), k) for i, k in enumerate(kinds, start=2)]
        assert ids == sorted(ids) and ids[0] > before[-1] and len(set(ids)) == 60
        st = ob.state()
        assert st["ok"] is False and "full" in st["error"], st
        assert st["memory"] > 0 and st["lost"] == 0 and ob.depth() == 62
        assert "kept in memory" in caplog.text
        # the sender sees one ordered queue: disk rows, then memory rows
        got = ob.pending(100)
        assert [r for r, _, _ in got] == before + ids
        assert [p for _, _, p in got] == [body(i) for i in range(62)]
        for rowid in before + ids[:40]:
            ob.ack(rowid)
        assert ob.depth() == 20
        assert [r for r, _, _ in ob.pending(100)] == ids[40:]

        filler.unlink()
        ob.retry()
        st = ob.state()
        assert st == {"ok": True, "error": None, "depth": 20, "memory": 0, "lost": 0}, st
        assert "writable again" in caplog.text
        later = ob.put("t", body(99), "end")
        assert later > ids[-1]
        ob.close()
        db = sqlite3.connect(path)
        on_disk = [r[0] for r in db.execute("SELECT id FROM outbox ORDER BY id")]
        db.close()
        assert on_disk == ids[40:] + [later]
    assert dict(m.dropped) == {}


def test_ids_keep_growing_across_memory_rows(tmp_path, quick_retry):
    # rows that lived only in memory and were acknowledged there still used their ids
    with tiny_fs(tmp_path / "fs") as d:
        ob = Outbox(d / "outbox.sqlite")
        first = ob.put("t", body(0), "new")
        filler = fill(d)
        in_memory = [ob.put("t", body(i), "end") for i in range(1, 40)]
        assert ob.state()["memory"] > 0
        for rowid in [first] + in_memory:
            ob.ack(rowid)
        filler.unlink()
        ob.retry()
        assert ob.state()["ok"] is True
        nxt = ob.put("t", body(99), "new")
        assert nxt > in_memory[-1]
        assert ob.pending(10, after=in_memory[-1]) == [(nxt, "t", body(99))]
        ob.close()


def test_memory_is_bounded_keeping_the_newest_new_and_end(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    m = Metrics()
    with tiny_fs(tmp_path / "fs") as d:
        fill(d)
        # full before the file exists: it cannot be created, everything stays in memory
        ob = Outbox(d / "outbox.sqlite", metrics=m, memory_rows=3)
        assert ob.state()["ok"] is False
        for p, k in [(b"new1", "new"), (b"upd1", "update"), (b"upd2", "update"),
                     (b"end1", "end"), (b"new2", "new"), (b"end2", "end")]:
            assert ob.put("t", p, k) is not None
        assert [p for _, _, p in ob.pending(10)] == [b"end1", b"new2", b"end2"]
        assert m.dropped["outbox_memory_full"] == 3
        assert "1 outbox_memory_full" in caplog.text       # the first loss, at once
        ob.close()
    # the held-back count and what exit loses are logged at close
    assert m.dropped["outbox_unsaved"] == 3
    assert "2 outbox_memory_full, 3 outbox_unsaved" in caplog.text
    assert "6 lost since start" in caplog.text


# ---------------------------------------------------------------- damage
def _filled(path: Path, n: int, acked: int = 0) -> list[int]:
    ob = Outbox(path)
    ids = [ob.put("t", body(i), ("new", "update", "end")[i % 3]) for i in range(n)]
    for rowid in ids[:acked]:
        ob.ack(rowid)
    ob.close()
    return ids


def scribble(path: Path, pages: range, seed: int = 7) -> None:
    rnd = random.Random(seed)
    with open(path, "r+b") as f:
        for pg in pages:
            f.seek(pg * 4096)
            f.write(rnd.randbytes(4096))


def test_damaged_pages_at_open_are_salvaged(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    path = tmp_path / "outbox.sqlite"
    ids = _filled(path, 800, acked=50)
    scribble(path, range(20, 28))
    m = Metrics()
    ob = Outbox(path, metrics=m)
    saved = ob.pending(5000)
    n, lost = len(saved), m.dropped["outbox_corrupt"]
    assert 500 < n < 750 and lost > 0
    assert n + lost == 750                       # every pending row is saved or counted
    assert f"saved {n} rows, lost {lost}" in caplog.text
    got = [r for r, _, _ in saved]
    assert got == sorted(got) and set(got) <= set(ids[50:])
    assert all(p == body(ids.index(r)) for r, _, p in saved)
    assert ob.state()["lost"] == lost and ob.state()["ok"] is True
    assert ob.put("t", b"after", "new") > ids[-1]
    ob.close()
    assert len(list(tmp_path.glob("outbox.sqlite.corrupt-*"))) == 1
    again = Outbox(path)                         # the fresh file is sound
    assert again.depth() == n + 1
    again.close()


def test_truncated_file_loss_is_counted_from_its_header(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    path = tmp_path / "outbox.sqlite"
    _filled(path, 200, acked=20)
    os.truncate(path, 4096)
    m = Metrics()
    ob = Outbox(path, metrics=m)
    assert ob.depth() == 0
    assert m.dropped["outbox_corrupt"] == 180
    assert "saved 0 rows, lost 180" in caplog.text
    ob.close()


def test_garbage_file_is_moved_aside(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    m = Metrics()
    ob = Outbox(path, metrics=m)
    assert ob.depth() == 0
    assert ob.put("t", b"x", "new") is not None
    assert "lost an unknown number (the header is unreadable)" in caplog.text
    assert dict(m.dropped) == {}                 # nothing countable was lost
    asides = list(tmp_path.glob("outbox.sqlite.corrupt-*"))
    assert len(asides) == 1 and asides[0].read_bytes().startswith(b"this is not")
    ob.close()


def _stale_cache(path: Path, rows: int) -> None:
    """Another writer moves the WAL on (keeping the stamped row count), so an open
    Outbox re-reads its pages, damaged ones included, instead of using its cache."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    other.execute("BEGIN IMMEDIATE")
    other.execute(f"PRAGMA user_version = {rows}")
    other.execute("COMMIT")
    other.close()


def test_damage_found_at_run_time(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    path = tmp_path / "outbox.sqlite"
    m = Metrics()
    ob = Outbox(path, metrics=m)
    ids = [ob.put("t", body(i), "update") for i in range(400)]
    scribble(path, range(15, 20))
    _stale_cache(path, 400)
    first = ob.pending(2000)                     # finds the damage and replaces the file
    assert "is damaged" in caplog.text
    saved = ob.pending(2000)
    lost = m.dropped["outbox_corrupt"]
    assert lost > 0 and len(saved) + lost == 400
    assert len(first) in (0, len(saved))
    assert [r for r, _, _ in saved] == sorted(r for r, _, _ in saved)
    nxt = ob.put("t", b"next", "end")
    assert nxt > ids[-1] and ob.pending(1, after=saved[-1][0])[0][0] == nxt
    ob.close()


def test_damage_found_by_a_write(tmp_path, quick_retry, caplog):
    caplog.set_level(logging.ERROR)
    path = tmp_path / "outbox.sqlite"
    m = Metrics()
    ob = Outbox(path, metrics=m)
    ids = [ob.put("t", body(i), "new") for i in range(50)]
    ob.close()
    ob = Outbox(path, metrics=m)
    scribble(path, range(1, path.stat().st_size // 4096))     # all but the header page
    _stale_cache(path, 50)
    nxt = ob.put("t", b"next", "end")            # finds the damage, replaces the file
    assert "is damaged" in caplog.text and m.dropped["outbox_corrupt"] == 50
    assert nxt > ids[-1] and ob.pending(10) == [(nxt, "t", b"next")]
    ob.retry()                                   # the event reaches the fresh file
    assert ob.state() == {"ok": True, "error": None, "depth": 1, "memory": 0, "lost": 50}
    ob.close()
    again = Outbox(path)
    assert again.pending(10) == [(nxt, "t", b"next")]
    again.close()


# ---------------------------------------------------------------- open alerts
def test_open_alerts_outlive_a_crash(tmp_path):
    path = tmp_path / "outbox.sqlite"
    ob = Outbox(path)
    assert ob.left_open() == []
    ob.put("t", b"a1-new", "new", alert_id="a1", last_ts=10.0)
    ob.put("t", b"a2-new", "new", alert_id="a2", last_ts=11.0)
    ob.touch({"a1": 12.5, "a2": 11.5})
    ob.put("t", b"a2-upd", "update", alert_id="a2", last_ts=13.0)
    ob.put("t", b"a1-end", "end", alert_id="a1")
    ob.touch({"a2": 14.0, "gone": 1.0})
    # no close(): a second process opens what a killed one left behind
    after = Outbox(path)
    assert after.left_open() == [("a2", "t", b"a2-upd", 14.0)]
    after.put("t", b"a2-end", "end", alert_id="a2")
    after.close()
    ob.close()
    assert Outbox(path).left_open() == []


# ---------------------------------------------------------------- unwritable
def test_state_dir_that_is_a_file_raises(tmp_path, caplog):
    (tmp_path / "f").write_text("")
    with pytest.raises(OutboxError, match=r"state_dir .*/f is not writable"):
        Outbox(tmp_path / "f" / "outbox.sqlite")


def test_read_only_state_dir_raises_without_moving_anything(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with tiny_fs(tmp_path / "fs") as d:
        _filled(d / "outbox.sqlite", 10)
        subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
        with pytest.raises(OutboxError, match="is not writable: Read-only file system"):
            Outbox(d / "outbox.sqlite")
        with pytest.raises(OutboxError, match="is not writable"):
            Outbox(d / "sub" / "outbox.sqlite")
        assert sorted(p.name for p in d.iterdir()) == ["outbox.sqlite"]
    assert "moved" not in caplog.text
