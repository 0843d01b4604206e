"""RingBuffer against a naive list-of-rows reference, plus its memory contract."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from agent.ring import SPARE, RingBuffer


class NaiveRing:
    """The documented semantics, one sample at a time, with plain lists."""

    def __init__(self, window, channels, stride, ffill_max, gap_reset_s):
        self.W, self.C, self.k, self.ffill, self.gap = window, channels, stride, ffill_max, gap_reset_s
        self.resets = self.skipped = 0
        self.prev_ts = None
        self._clear()

    def _clear(self):
        self.rows = []
        self.last = [math.nan] * self.C
        self.run = [0] * self.C

    def push_one(self, t, v):
        if self.gap is not None and self.prev_ts is not None and t - self.prev_ts > self.gap:
            self._clear()
            self.resets += 1
        self.prev_ts = t
        row = []
        for c in range(self.C):
            if math.isfinite(v[c]):
                self.last[c], self.run[c] = float(v[c]), 0
                row.append(float(v[c]))
            else:
                self.run[c] += 1
                row.append(self.last[c] if self.run[c] <= self.ffill else math.nan)
        self.rows.append(row)
        n = len(self.rows)
        if n >= self.W and (n - self.W) % self.k == 0:
            win = self.rows[-self.W:]
            if any(math.isnan(x) for r in win for x in r):
                self.skipped += 1
                return None
            return t, np.array(win, dtype=np.float32)
        return None


def _reference(ring_args, blocks):
    ref = NaiveRing(*ring_args)
    out_ts, out_x = [], []
    for ts, vals in blocks:
        for t, v in zip(ts, vals):
            w = ref.push_one(t, v)
            if w is not None:
                out_ts.append(w[0])
                out_x.append(w[1])
    return ref, out_ts, out_x


@st.composite
def scenario(draw):
    W = draw(st.integers(1, 7))
    C = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 4))
    ffill = draw(st.integers(0, 3))
    gap = draw(st.sampled_from([None, 5.0]))
    max_block = draw(st.integers(1, 9))
    n_blocks = draw(st.integers(1, 8))
    t = 0.0
    blocks = []
    for _ in range(n_blocks):
        n = draw(st.integers(0, 20))
        steps = draw(st.lists(st.sampled_from([1.0, 1.0, 1.0, 0.0, -0.5, 7.0]), min_size=n, max_size=n))
        ts = []
        for s in steps:
            t += s
            ts.append(t)
        nan_p = draw(st.sampled_from([0.0, 0.1, 0.5]))
        vals = np.array(draw(st.lists(
            st.lists(st.floats(-100, 100, width=32), min_size=C, max_size=C), min_size=n, max_size=n)),
            dtype=np.float32).reshape(n, C)
        mask = np.array(draw(st.lists(st.floats(0, 1), min_size=n * C, max_size=n * C))).reshape(n, C) < nan_p
        vals[mask] = np.nan
        blocks.append((np.array(ts, dtype=np.float64), vals))
    return (W, C, stride, ffill, gap), max_block, blocks


@settings(max_examples=200, deadline=None)
@given(scenario())
def test_matches_naive_reference(sc):
    args, max_block, blocks = sc
    ring = RingBuffer(*args[:2], stride=args[2], ffill_max=args[3], gap_reset_s=args[4],
                      max_block=max_block)
    got_ts, got_x = [], []
    for ts, vals in blocks:
        w = ring.push(ts, vals)
        assert w.x.dtype == np.float32 and w.x.flags.c_contiguous
        assert w.x.shape == (len(w.ts), args[0], args[1]) and w.ts.dtype == np.float64
        got_ts.extend(w.ts.tolist())
        got_x.extend(list(w.x))
    ref, ref_ts, ref_x = _reference(args, blocks)
    assert got_ts == ref_ts
    assert len(got_x) == len(ref_x)
    for a, b in zip(got_x, ref_x):
        np.testing.assert_array_equal(a, b)
    assert ring.skipped == ref.skipped
    assert ring.resets == ref.resets
    assert ring.filled == min(len(ref.rows), args[0])
    if len(ref.rows) >= args[0]:
        np.testing.assert_array_equal(ring.latest(), np.array(ref.rows[-args[0]:], dtype=np.float32))


def test_latest_is_a_view_into_the_buffer():
    ring = RingBuffer(window=4, channels=2, max_block=3)
    ring.push(np.arange(10.0), np.arange(20, dtype=np.float32).reshape(10, 2))
    a = ring.latest()
    assert np.shares_memory(a, ring._buf)
    assert a.base is not None
    np.testing.assert_array_equal(a, np.arange(12, 20, dtype=np.float32).reshape(4, 2))


def test_block_larger_than_max_block_gives_every_window():
    ring = RingBuffer(window=5, channels=1, stride=2, max_block=3)
    n = 100
    w = ring.push(np.arange(n, dtype=float), np.arange(n, dtype=np.float32)[:, None])
    # windows end at samples 4, 6, ..., 98
    np.testing.assert_array_equal(w.ts, np.arange(4, n, 2, dtype=float))
    np.testing.assert_array_equal(w.x[:, :, 0], w.ts[:, None] + np.arange(-4, 1))


def test_stride_counts_from_the_reset_not_globally():
    ring = RingBuffer(window=3, channels=1, stride=4, gap_reset_s=10.0)
    v = np.ones((7, 1), np.float32)
    first = ring.push(np.arange(7.0), v)
    second = ring.push(np.arange(7.0) + 100.0, v)   # a 94 s gap: reset
    assert ring.resets == 1
    np.testing.assert_array_equal(first.ts, [2.0, 6.0])
    np.testing.assert_array_equal(second.ts, [102.0, 106.0])


def test_unfillable_nan_skips_windows_and_recovers():
    ring = RingBuffer(window=3, channels=2, ffill_max=1)
    v = np.ones((10, 2), np.float32)
    v[3:6, 1] = np.nan          # 3 missing in a row: 1 filled, 2 stay NaN (rows 4, 5)
    w = ring.push(np.arange(10.0), v)
    # windows ending at 4..7 contain row 4 or 5
    np.testing.assert_array_equal(w.ts, [2.0, 3.0, 8.0, 9.0])
    assert ring.skipped == 4
    assert not np.isnan(w.x).any()


def test_empty_push_and_shape_errors():
    ring = RingBuffer(window=2, channels=3)
    w = ring.push(np.empty(0), np.empty((0, 3), np.float32))
    assert w.x.shape == (0, 2, 3) and len(w) == 0
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        ring.push(np.arange(2.0), np.ones((2, 4), np.float32))


def test_memory_is_window_plus_max_block_rows_however_long_it_runs():
    # a stream's ring is its largest per-stream array: its size is bounded by the model's
    # window and the engine's max_block, never by how much or how unevenly it is fed;
    # the room behind the window follows the largest recent block, SPARE rows at least
    W, C, B = 64, 8, 192
    ring = RingBuffer(window=W, channels=C, max_block=B)
    assert ring._buf.nbytes == (W + SPARE) * C * 4          # nothing came yet
    rng = np.random.default_rng(0)
    t, sizes = 0, set()

    def feed(blocks):
        nonlocal t
        for n in blocks:
            ring.push(t + np.arange(n, dtype=float), rng.normal(size=(n, C)).astype(np.float32))
            t += n
            sizes.add(len(ring._buf))

    feed(rng.integers(1, 3 * B, 300).tolist())
    assert max(sizes) == W + B
    feed([64] * 20)
    assert ring._buf.nbytes == (W + 64) * C * 4            # blocks of 64: room for 64
    feed([1] * 200)
    assert min(sizes) == W + SPARE
    assert ring._buf.nbytes == (W + SPARE) * C * 4         # the small blocks came last
    assert np.shares_memory(ring.latest(), ring._buf)
    ring.push(t + np.arange(B, dtype=float), np.zeros((B, C), np.float32))
    assert ring._buf.nbytes == (W + B) * C * 4              # a large block: room again
