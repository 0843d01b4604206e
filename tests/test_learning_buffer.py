"""The learning period's buffer (agent/baseline.py): the samples come back whole and in
order however they arrived, held in an anonymous mapping of their own (not glibc's heap,
where freeing them at the end of learning left holes); the heap serves when no mapping
can be made."""
from __future__ import annotations

import mmap

import numpy as np

from agent import baseline
from agent.baseline import _Held

MMAP = mmap.mmap        # the type, kept: one test replaces the module's attribute


def owner(a: np.ndarray):
    """What holds an array's memory: an mmap, or None (numpy's own allocation)."""
    while isinstance(a, np.ndarray):
        a = a.base
    return a.obj if isinstance(a, memoryview) else a


def fill(h: _Held, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ts, vs, t = [], [], 0.0
    for m in sizes:
        ts.append(t + np.arange(m, dtype=np.float64))
        vs.append(rng.normal(size=(m, 3)).astype(np.float32))
        t += m
        h.add(ts[-1], vs[-1], (float(ts[-1][0]), float(ts[-1][-1])))
    return np.concatenate(ts), np.concatenate(vs)


def test_samples_come_back_in_order_across_growth_from_a_mapping_of_their_own():
    h = _Held(3, 16)
    want_ts, want_v = fill(h, [1, 5, 200, 3, 700, 1])      # grows past its first size twice
    assert isinstance(owner(h._ts), MMAP) and owner(h._values) is owner(h._ts)
    got_ts, got_v = h.take()
    assert got_ts.tobytes() == want_ts.tobytes() and got_v.tobytes() == want_v.tobytes()
    assert h.n == 0 and h._ts is None


def test_without_a_mapping_the_heap_holds_them(monkeypatch):
    def refuse(*a, **k):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(baseline.mmap, "mmap", refuse)
    h = _Held(3, 16)
    want_ts, want_v = fill(h, [10, 300, 2])
    assert owner(h._ts) is None
    got_ts, got_v = h.take()
    assert got_ts.tobytes() == want_ts.tobytes() and got_v.tobytes() == want_v.tobytes()
