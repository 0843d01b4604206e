"""Per-stream sliding window over incoming samples.

The buffer holds `window + room` rows (float32), written front to back; the
newest `window` rows always end at the write position.  A block that does not fit
behind them first moves those `window` rows to the front, so the rows needed by a
whole block (W-1 old ones plus the block) are one contiguous slice, and the due
windows are gathered from it in a single fancy-indexing copy.  Each row is written
once, plus once more per move: with blocks of about a window about two writes per
sample, as many as a mirrored ring makes, in half its memory.  The room behind the
window is sized at each move by the largest block since the last one: SPARE rows
while only small blocks come (a daemon's few samples per step: a quarter less memory
at window 64, a 2 KB move every 16 samples), that block's rows once one was larger,
never more than max_block (memory per stream: at most (window + max_block) x
channels x 4 bytes, test_ring.py checks it).  So a replay's long blocks (an ingest
of several adaptation epochs) get the room they need without a daemon's streams,
which saw such a block only at the end of their learning period, keeping it.  All other
work (forward fill, NaN bookkeeping, stride schedule) is vectorised over the block,
so the cost per appended sample is O(C) however long the stream runs.

Semantics, in the order they apply to each sample:
- time gap: if ts - previous ts > gap_reset_s, the buffer is reset before the
  sample is appended (counted in `resets`); a non-increasing ts is clock jitter,
  not a gap.
- forward fill: a NaN takes the channel's last finite value for up to
  `ffill_max` consecutive missing samples; after that (or before any finite
  value since the last reset) it stays NaN.
- stride: counting samples since the last reset, the first window is due when
  the buffer holds `window` samples, then every `stride` samples.
- a due window that still contains NaN is dropped and counted in `skipped` (and in the
  process-wide `metrics.windows_skipped` when a Metrics is given); `unscored` counts those
  dropped since the last window returned, `unfilled` per channel the samples left NaN.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass
class Windows:
    ts: np.ndarray      # float64 [k]  timestamp of each window's newest sample
    x: np.ndarray       # float32 [k, W, C], C-contiguous
    rows: np.ndarray    # int64 [k]  row of the pushed block each window ends at
    # the stream's clock offset at each window ([k]) or at all of them (agent/sample_clock.py;
    # the stream sets it: the ring knows only timestamps)
    off: float | np.ndarray = 0.0
    # windows of the block the model gave no finite score, left out (agent/model_call.py)
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.ts)


SPARE = 16      # rows behind the window while every block is at most this long


@lru_cache(maxsize=None)
def _window_offsets(window: int) -> np.ndarray:
    # one read-only copy per window length, not one per stream
    a = np.arange(window)
    a.flags.writeable = False
    return a


class RingBuffer:
    __slots__ = ("window", "channels", "stride", "ffill_max", "gap_reset_s", "max_block",
                 "_buf", "_end", "_largest", "_offsets", "_total", "resets", "skipped",
                 "_since", "_prev_ts", "_last_val", "_missing_run", "_missing", "_last_nan_row",
                 "metrics", "unscored", "unfilled")

    def __init__(self, window: int, channels: int, stride: int = 1, ffill_max: int = 3,
                 gap_reset_s: float | None = None, max_block: int = 1024, metrics=None):
        if window < 1 or channels < 1 or stride < 1 or ffill_max < 0 or max_block < 1:
            raise ValueError("window, channels, stride, max_block must be >= 1 and ffill_max >= 0")
        self.window = window
        self.channels = channels
        self.stride = stride
        self.ffill_max = ffill_max
        self.gap_reset_s = gap_reset_s
        self.max_block = max_block
        self._buf = np.full((window + min(SPARE, max_block), channels), np.nan, np.float32)
        self._end = window       # write position: the newest `window` rows end here
        self._largest = 0        # the largest block since the last move (its cause included)
        self._offsets = _window_offsets(window)
        self._total = 0          # rows ever written, never reset (NaN bookkeeping)
        self.resets = 0          # resets caused by time gaps
        self.skipped = 0         # due windows dropped because of unfillable NaN
        self.metrics = metrics   # agent.metrics.Metrics: every ring's drops, summed
        # due windows dropped since the last one returned (a gap's reset does not end them:
        # no window was scored since)
        self.unscored = 0
        self.unfilled: np.ndarray | None = None   # per channel, samples left NaN (None: none)
        self.reset()

    @property
    def filled(self) -> int:
        """Samples in the current window since the last reset (0..window)."""
        return min(self._since, self.window)

    def reset(self) -> None:
        """Forget the current window and the forward-fill state."""
        self._since = 0
        self._prev_ts: float | None = None
        self._last_val = np.full(self.channels, np.nan, dtype=np.float32)
        self._missing_run = np.zeros(self.channels, dtype=np.int64)
        self._missing = False    # whether _missing_run may hold a non-zero count
        self._last_nan_row = -1  # global row index of the newest row still holding NaN

    def dead(self) -> list[int]:
        """The channels without a value for a whole window past the forward fill (never
        sent since the last reset, or NaN since): no window can be scored while one is."""
        if not self._missing:
            return []
        return np.flatnonzero(self._missing_run >= self.ffill_max + self.window).tolist()

    def latest(self) -> np.ndarray:
        """The newest `window` rows as a view into the buffer, valid until the next push.

        Rows older than `filled` belong to before the last reset (or are NaN at start)."""
        return self._buf[self._end - self.window:self._end]

    def push(self, ts: np.ndarray, values: np.ndarray) -> Windows:
        ts = np.asarray(ts, dtype=np.float64).reshape(-1)
        values = np.asarray(values, dtype=np.float32)
        if values.ndim != 2 or values.shape != (len(ts), self.channels):
            raise ValueError(f"values must be [{len(ts)}, {self.channels}], got {values.shape}")
        n = len(ts)
        if n and n <= self.max_block and not self._gap_in(ts):
            # the usual block: one piece, no reset (the loop below, without its bookkeeping)
            w = self._append(ts, values)
            self._prev_ts = float(ts[-1])
            return w if w is not None else self._none()
        parts = []
        for a, b, gap in self._segments(ts):
            if gap:
                self.reset()
                self.resets += 1
            for s in range(a, b, self.max_block):
                e = min(b, s + self.max_block)
                w = self._append(ts[s:e], values[s:e])
                if w is not None:
                    if s:
                        w.rows += s
                    parts.append(w)
        if len(ts):
            self._prev_ts = float(ts[-1])
        if not parts:
            return self._none()
        if len(parts) == 1:
            return parts[0]
        return Windows(np.concatenate([p.ts for p in parts]),
                       np.concatenate([p.x for p in parts]),
                       np.concatenate([p.rows for p in parts]))

    # ------------------------------------------------------------ internals
    def _none(self) -> Windows:
        return Windows(np.empty(0, np.float64),
                       np.empty((0, self.window, self.channels), np.float32),
                       np.empty(0, np.int64))

    def _gap_in(self, ts: np.ndarray) -> bool:
        """Whether the block starts or holds a gap over gap_reset_s."""
        g = self.gap_reset_s
        if g is None:
            return False
        if self._gap_before(ts):
            return True
        if len(ts) > 8:
            return bool((ts[1:] - ts[:-1] > g).any())
        t = ts.tolist()     # a few samples: Python floats beat array calls
        return any(b - a > g for a, b in zip(t, t[1:]))

    def _gap_before(self, ts: np.ndarray) -> bool:
        """Whether the block's first sample comes over gap_reset_s after the previous one."""
        return self._prev_ts is not None and ts[0] - self._prev_ts > self.gap_reset_s

    def _segments(self, ts: np.ndarray):
        """(start, end, reset_first) runs of the block split at time gaps."""
        n = len(ts)
        if n == 0:
            return ()
        if self.gap_reset_s is None:
            return ((0, n, False),)
        first_gap = self._gap_before(ts)
        if n == 1:
            return ((0, 1, bool(first_gap)),)
        cuts = (np.flatnonzero(ts[1:] - ts[:-1] > self.gap_reset_s) + 1).tolist()
        bounds = [0, *cuts, n]
        return [(bounds[i], bounds[i + 1], i > 0 or bool(first_gap))
                for i in range(len(bounds) - 1)]

    def _ffill(self, v: np.ndarray) -> tuple[np.ndarray, bool]:
        """Forward-filled rows and whether any NaN is left in them."""
        finite = np.isfinite(v)
        if np.logical_and.reduce(finite, axis=None):     # .all() without its wrapper
            self._last_val = v[-1].copy()
            if self._missing:
                self._missing_run[:] = 0
                self._missing = False
            return v, False
        self._missing = True
        m = len(v)
        rows = np.arange(m)[:, None]
        src = np.maximum.accumulate(np.where(finite, rows, -1), axis=0)   # last finite row
        has_src = src >= 0
        cols = np.arange(self.channels)[None, :]
        fill = np.where(has_src, v[np.maximum(src, 0), cols], self._last_val[None, :])
        run = np.where(has_src, rows - src, self._missing_run[None, :] + rows + 1)
        out = np.where(finite | (run <= self.ffill_max), fill, np.float32(np.nan))
        left = np.isnan(out).sum(axis=0)
        self.unfilled = left if self.unfilled is None else self.unfilled + left
        self._last_val = fill[-1].astype(np.float32)
        self._missing_run = run[-1].astype(np.int64)
        return out.astype(np.float32, copy=False), True

    def _write(self, rows: np.ndarray) -> None:
        """Append at most max_block rows behind the newest `window` ones."""
        m, W, end = len(rows), self.window, self._end
        if end + m > len(self._buf):
            self._move_front(max(self._largest, m))
            end = W
        if m > self._largest:
            self._largest = m
        self._buf[end:end + m] = rows
        self._end = end + m
        self._total += m

    def _move_front(self, largest: int) -> None:
        """Move the newest `window` rows to the front, into a buffer with room for the
        `largest` block since the last move (this one included), SPARE rows at least."""
        W, end = self.window, self._end
        room = min(max(largest, SPARE), self.max_block)
        if W + room == len(self._buf):
            self._buf[:W] = self._buf[end - W:end]
        else:
            buf = np.empty((W + room, self.channels), np.float32)
            buf[:W] = self._buf[end - W:end]
            self._buf = buf
        self._largest = 0

    def _append(self, ts: np.ndarray, v: np.ndarray) -> Windows | None:
        m, W = len(ts), self.window
        rows, maybe_nan = self._ffill(v)
        g0 = self._total                              # global index of rows[0]
        last_nan = None
        if maybe_nan:
            nan_rows = np.isnan(rows).any(axis=1)
            if nan_rows.any():
                last_nan = np.maximum(np.maximum.accumulate(
                    np.where(nan_rows, g0 + np.arange(m), -1)), self._last_nan_row)
                self._last_nan_row = int(last_nan[-1])
        self._write(rows)

        since0 = self._since
        self._since += m
        # first sample index (since reset) at which a window is due, at or after since0
        first = W - 1 if since0 <= W - 1 else \
            since0 + (-(since0 - (W - 1))) % self.stride
        if first - since0 >= m:
            return None
        due = np.arange(first - since0, m, self.stride)   # row indices within this block
        # a window is clean when its oldest row is newer than the last NaN row before its end
        if last_nan is not None or self._last_nan_row >= g0 + first - since0 - (W - 1):
            newest_nan = self._last_nan_row if last_nan is None else last_nan[due]
            ok = newest_nan < g0 + due - (W - 1)
            n_ok = int(ok.sum())
            self._dropped(ok, n_ok)
            if n_ok == 0:
                return None
            if n_ok < len(due):
                due = due[ok]
        else:
            self.unscored = 0
        # region = the W-1 rows before this block + the block, contiguous (see _write)
        region = self._buf[self._end - (W - 1 + m):self._end]
        if len(due) == 1:       # one window (a daemon's sample): a slice, not a gather
            d = int(due[0])
            x = region[None, d:d + W].copy()
        else:
            x = region.take(due[:, None] + self._offsets[None, :], axis=0)
        return Windows(ts[due], x, due.astype(np.int64, copy=False))

    def _dropped(self, ok: np.ndarray, n_ok: int) -> None:
        """Count the due windows `ok` (bool, one per window, in order) leaves out."""
        n = len(ok) - n_ok
        self.skipped += n
        if self.metrics is not None:
            self.metrics.windows_skipped += n
        # those after the last clean one (all of them, and the earlier ones, if none is)
        self.unscored = self.unscored + n if n_ok == 0 else \
            len(ok) - 1 - int(np.flatnonzero(ok)[-1])
