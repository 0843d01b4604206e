"""agent.state_writer: the daemon's baselines reach the disk in a thread of their own, so
hundreds of fsyncs at a periodic save or a shared end of learning never stall detection;
the newest operation per stream wins, a load sees what was queued, refused writes are
retried, and a clean stop leaves everything on disk."""
from __future__ import annotations

import threading

import pytest

from agent.state_store import StateStore
from agent.state_writer import StateWriter
from test_state_store import SHA_A, record


@pytest.fixture
def writes(monkeypatch):
    """(stream file name, thread name) of every file StateStore writes; a file named in
    `hold` waits for `release` before it is written."""
    seen: list[tuple[str, str]] = []
    hold: dict[str, threading.Event] = {}
    real = StateStore._write

    def spy(self, p, body):
        if p.name in hold:
            hold[p.name].wait(10)
        seen.append((p.name, threading.current_thread().name))
        real(self, p, body)
    monkeypatch.setattr(StateStore, "_write", spy)
    return seen, hold


def test_saves_are_written_by_the_writer_thread_not_the_caller(tmp_path, writes):
    seen, _ = writes
    w = StateWriter(StateStore(tmp_path))
    for i in range(5):
        w.save(f"s{i}", SHA_A, record(thr=0.1 * (i + 1)))
    w.flush()
    assert sorted(seen) == [(f"s{i}.json", "state-writer") for i in range(5)]
    assert [w.store.load(f"s{i}", SHA_A, 2)["threshold"] for i in range(5)] == \
        pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    w.close()


def test_the_newest_operation_per_stream_wins(tmp_path, writes):
    _, hold = writes
    w = StateWriter(StateStore(tmp_path))
    w.save("s", SHA_A, record(thr=0.5))
    w.flush()
    hold["busy.json"] = gate = threading.Event()
    w.save("busy", SHA_A, record())         # the thread waits inside this one
    w.forget("s")
    w.save("s", SHA_A, record(thr=0.9))     # a new baseline after a forget: written
    w.save("t", SHA_A, record())
    w.forget("t")                           # a forget after a save: no file
    assert w.queued() == 3                  # busy (being written), s, t
    gate.set()
    w.flush()
    assert w.store.load("s", SHA_A, 2)["threshold"] == 0.9
    assert not w.store.path("t").exists() and w.store.path("busy").exists()
    w.close()


def test_a_load_applies_what_is_queued_for_its_stream_first(tmp_path, writes):
    seen, hold = writes
    w = StateWriter(StateStore(tmp_path))
    hold["busy.json"] = gate = threading.Event()
    w.save("busy", SHA_A, record())
    w.save("s", SHA_A, record(thr=0.7))
    # the thread is held on "busy": the load writes "s" itself, in this thread
    assert w.load("s", SHA_A, 2)["threshold"] == 0.7
    assert ("s.json", threading.current_thread().name) in seen
    gate.set()
    w.close()
    assert [name for name, _ in seen].count("s.json") == 1


def test_a_refused_write_is_reported_and_retried(tmp_path):
    w = StateWriter(StateStore(tmp_path))
    (tmp_path / "calibration").write_text("a file where the folder should be")
    w.save("s", SHA_A, record())
    w.flush()
    h = w.health()
    assert h["ok"] is False and h["unsaved"] == 1
    (tmp_path / "calibration").unlink()
    w.retry()
    w.flush()
    assert w.health() == {"ok": True, "error": None, "unsaved": 0}
    assert w.load("s", SHA_A, 2)["threshold"] == 0.3
    w.close()


def test_close_writes_what_is_queued_and_ends_the_thread(tmp_path, writes):
    _, hold = writes
    w = StateWriter(StateStore(tmp_path))
    hold["a.json"] = gate = threading.Event()
    w.save("a", SHA_A, record())
    w.save("b", SHA_A, record())
    threading.Timer(0.2, gate.set).start()
    w.close()
    assert w.store.path("a").exists() and w.store.path("b").exists()
    assert not w._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        w.save("c", SHA_A, record())
