"""The pipeline's bounded hand-off (agent.inbox): order, wake-ups, back-pressure."""
from __future__ import annotations

import threading
import time

from agent.inbox import Inbox


def test_items_come_out_in_order_and_pop_on_empty_is_none():
    q = Inbox(10)
    for i in range(5):
        assert q.put(i)
    assert q.qsize() == 5
    assert [q.pop() for _ in range(6)] == [0, 1, 2, 3, 4, None]


def test_wait_wakes_on_a_put_from_another_thread_and_times_out_when_none_comes():
    q = Inbox(10)
    assert q.wait(0.05) is False
    threading.Timer(0.1, q.put, ("x",)).start()
    assert q.wait(10.0) is True
    assert q.pop() == "x"
    assert q.wait(0.05) is False


def test_a_full_inbox_blocks_the_producer_until_half_of_it_is_taken():
    q = Inbox(4)
    for i in range(4):
        q.put(i)
    assert q.put("late", timeout=0.05) is False, "a full inbox must refuse after the timeout"
    done = threading.Event()

    def producer():
        q.put("blocked")      # no timeout: waits for room
        done.set()

    t = threading.Thread(target=producer, daemon=True)
    t.start()
    time.sleep(0.1)
    assert not done.is_set() and q.qsize() == 4
    assert q.pop() == 0          # 3 left: more than half full, the producer stays blocked
    time.sleep(0.1)
    assert not done.is_set()
    assert q.pop() == 1          # 2 left: half empty, it resumes
    assert done.wait(10.0)
    t.join(10.0)
    assert [q.pop() for _ in range(4)] == [2, 3, "blocked", None]


def test_many_producers_lose_nothing():
    q = Inbox(64)
    n, producers = 5000, 4
    threads = [threading.Thread(target=lambda k=k: [q.put((k, i)) for i in range(n)])
               for k in range(producers)]
    for t in threads:
        t.start()
    got: list = []
    while len(got) < n * producers:
        if q.wait(10.0):
            while (item := q.pop()) is not None:
                got.append(item)
    for t in threads:
        t.join(10.0)
    for k in range(producers):
        assert [i for kk, i in got if kk == k] == list(range(n)), "per-producer order kept"
