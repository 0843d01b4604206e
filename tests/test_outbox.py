"""Outbox: durable SQLite queue (WAL), order, ack, bounded size policy, recovery."""
from __future__ import annotations

import threading

from agent.metrics import Metrics
from agent.outbox import Outbox


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
    assert u1 not in [r for r, _, _ in ob.pending(10)]
    ob.close()


def test_corrupt_file_is_moved_aside(tmp_path):
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    m = Metrics()
    ob = Outbox(path, metrics=m)
    assert ob.depth() == 0
    assert ob.put("t", b"x", "new") is not None
    assert m.dropped["outbox_corrupt"] == 1
    assert len(list(tmp_path.glob("outbox.sqlite.corrupt-*"))) == 1
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
