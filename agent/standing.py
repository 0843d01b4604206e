"""Is an open alert standing: has its score settled into a new steady level?

The rule (AlertTracker's docstring): open at least `span` seconds, and the median score of
the last half of that span within STANDING_CHANGE of the half before, both at or above the
threshold.  A sample's half is judged by its timestamp against the last sample's.

The check runs at every engine step while an alert is open, so its cost must not grow
with the span: at 100 Hz a 600 s span holds 60,000 scores, and taking two medians of them
at every one-sample step cost twenty times the rest of the tracker's step.  So each half
keeps its scores sorted and reads its median in O(1); a step moves only the samples that
changed half, each with a binary search and one in-place shift (a memmove, no allocation).

The times are the stream's elapsed time (agent/sample_clock.py), so a device clock's step
back does not reorder them; they may still step back a little (clock jitter is not a gap:
agent/ring.py), so the samples are kept sorted by time too, and the boundary between
halves can move either way; a sample once older than the span is dropped for good.  NaN
scores are counted, not sorted: a half holding one has no median (the rule never settles
on it).
"""
from __future__ import annotations

import numpy as np

STANDING_CHANGE = 0.25   # a settled score moves less than this (relative) per half span
# up to this many values per step are shifted in place, one slice per value; more are
# cheaper as one np.insert / np.delete (a copy of the whole set)
_FEW = 32


def _finite(x: np.ndarray) -> np.ndarray:
    # one sample (the daemon's usual step) without a mask array
    return x if len(x) == 1 and x[0] == x[0] else x[~np.isnan(x)]


class _Sorted:
    """A sorted multiset of finite floats in a growable array, plus a count of NaNs."""

    __slots__ = ("v", "n", "nans")

    def __init__(self) -> None:
        self.v, self.n, self.nans = np.empty(16), 0, 0

    def add(self, x: np.ndarray) -> None:
        fin = _finite(x)
        self.nans += len(x) - len(fin)
        n, k = self.n, len(fin)
        if not k:
            return
        if n + k > len(self.v):
            grown = np.empty(2 * (n + k))
            grown[:n] = self.v[:n]
            self.v = grown
        v = self.v
        fin = np.sort(fin) if k > 1 else fin
        pos = np.searchsorted(v[:n], fin).tolist()
        if k <= _FEW:
            # each old value moves once, right by the new values before it (one memmove
            # per gap; np.insert would allocate and copy the whole set)
            end = n
            for i in range(k - 1, -1, -1):
                p = pos[i]
                v[p + i + 1:end + i + 1] = v[p:end]
                v[p + i] = fin[i]
                end = p
        else:
            v[:n + k] = np.insert(v[:n], pos, fin)
        self.n = n + k

    def remove(self, x: np.ndarray) -> None:
        """Take out the values `x`, every one of which is in the set."""
        fin = _finite(x)
        self.nans -= len(x) - len(fin)
        n, k, v = self.n, len(fin), self.v
        if not k:
            return
        fin = np.sort(fin) if k > 1 else fin
        # the i-th copy of a value goes at the i-th position its run starts from
        pos = np.searchsorted(v[:n], fin)
        if k > 1:
            pos += np.arange(k) - np.searchsorted(fin, fin)
        if k <= _FEW:
            # each kept value moves once, left by the removed values before it
            pos = pos.tolist() + [n]
            for i in range(k):
                v[pos[i] - i:pos[i + 1] - i - 1] = v[pos[i] + 1:pos[i + 1]]
        else:
            v[:n - k] = np.delete(v[:n], pos)
        self.n = n - k

    def median(self) -> float:
        """np.median of the set: NaN if it holds a NaN, else its middle (or the mean of its
        two middle values, summed and halved as np.median does)."""
        n, v = self.n, self.v
        if self.nans or not n:
            return float("nan")
        if n % 2:
            return float(v[n // 2])
        return float((v[n // 2 - 1] + v[n // 2]) / 2)


class StandingCheck:
    """The open alert's scores over the last `span` seconds, split into two halves."""

    __slots__ = ("span", "_t", "_s", "_lo", "_mid", "_hi", "_older", "_newer", "last_ts")

    def __init__(self, span: float) -> None:
        self.span = span
        # by time, in growable arrays: samples [_lo, _mid) form the older half,
        # [_mid, _hi) the newer one
        self._t, self._s = np.empty(64), np.empty(64)
        self._lo = self._mid = self._hi = 0
        self._older, self._newer = _Sorted(), _Sorted()
        self.last_ts = float("nan")         # the last sample's time, in arrival order

    def add(self, ts: np.ndarray, scores: np.ndarray) -> None:
        """Take the alert's next windows (arrival order) and re-split the span."""
        k = len(ts)
        if not k:
            return
        self.last_ts = float(ts[-1])
        lo, hi = self._lo, self._hi
        if hi > lo and ts[0] < self._t[hi - 1] or k > 1 and np.any(ts[1:] < ts[:-1]):
            self._merge(ts, scores)
        else:
            if hi + k > len(self._t):
                self._room(k)
                hi = self._hi
            self._t[hi:hi + k], self._s[hi:hi + k] = ts, scores
            self._hi = hi + k
            self._newer.add(np.asarray(scores, np.float64))
        self._resplit()

    def _room(self, k: int) -> None:
        """Move the live samples to the front, growing the arrays when half of them is full."""
        live = self._hi - self._lo
        size = len(self._t) if 2 * (live + k) <= len(self._t) else 2 * (live + k)
        for name in ("_t", "_s"):
            old = getattr(self, name)
            new = old if size == len(old) else np.empty(size)
            new[:live] = old[self._lo:self._hi]
            setattr(self, name, new)
        self._mid -= self._lo
        self._lo, self._hi = 0, live

    def _merge(self, ts: np.ndarray, scores: np.ndarray) -> None:
        """Clock jitter: the new samples go in by time (equal times keep arrival order),
        and the halves are rebuilt; rare, so it may cost a sort."""
        t = np.concatenate([self._t[self._lo:self._hi], ts])
        order = np.argsort(t, kind="stable")
        s = np.concatenate([self._s[self._lo:self._hi], scores])[order]
        self._t, self._s = t[order], s
        self._lo = self._mid = 0
        self._hi = len(t)
        self._older, self._newer = _Sorted(), _Sorted()
        self._newer.add(s)

    def _resplit(self) -> None:
        t = self._t
        lo, hi = self._lo, self._hi
        mid = lo + int(np.searchsorted(t[lo:hi], self.last_ts - self.span / 2, "left"))
        if mid > self._mid:
            moved = self._s[self._mid:mid]
            self._newer.remove(moved)
            self._older.add(moved)
        elif mid < self._mid:
            moved = self._s[mid:self._mid]
            self._older.remove(moved)
            self._newer.add(moved)
        self._mid = mid
        # older than the span: out of the older half (the span's start is before its middle)
        gone = int(np.searchsorted(t[lo:mid], self.last_ts - self.span, "left"))
        if gone:
            self._older.remove(self._s[lo:lo + gone])
            self._lo = lo + gone

    def settled(self, start: float, threshold: float) -> bool:
        """Open at least a span since `start`, both halves non-empty, at or above
        `threshold`, and their medians within STANDING_CHANGE of each other."""
        # (an empty span has both halves empty; last_ts is NaN before any sample)
        if not self.last_ts - start >= self.span or self._mid == self._lo or self._hi == self._mid:
            return False
        m1, m2 = self._older.median(), self._newer.median()
        return min(m1, m2) >= threshold and abs(m2 - m1) <= STANDING_CHANGE * m1
