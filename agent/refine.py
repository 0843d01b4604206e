"""Threshold refinement: a learned threshold narrowed once, on the stream's own steady running.

A learning period is short against a machine's life (400 samples in the SKAB protocol), so
the threshold it fits carries a wide margin: the stream must stay quiet through what
follows learning while adaptation catches up with the machine's warm-up.  Once it has,
the stream's normal windows show how high its scores really go (`calibration.refine`):

- The span runs from `after_s` to `after_s + span_s` of running time after the first
  sample that follows the learning period.  Running time is elapsed sample time
  (agent/sample_clock.py) less the stops: a gap longer than the stream's gap rule
  (`buffer.gap_reset_s`, the gap that restarts its window) counts as no time, so a
  machine that stands still in the middle of the span (a night, a break shorter than
  `idle_evict_s`) takes up the span where it left it, and its windows, which only running
  makes, still fill it.  With `gap_reset_s: null` no gap is a stop.
- Its windows that scored under the threshold with no alert open are counted in a
  histogram of score / threshold: BINS log-spaced bins from 1e-3 to 1, 2.3 % wide, so a
  stream holds 1.2 KB while its span lasts however fast it samples, and the counts do not
  depend on how its samples were chunked.
- Before the first window of the samples from the first one at or after the span's end
  (the first sample with a running time there, even when it closes no window or the
  next sample's clock jitters back), the threshold becomes `margin` x the upper edge of
  the bin holding those windows' `calibration.quantile`, if that is lower.
  It never rises: the learned threshold is the one the model's policy was fitted to
  keep quiet.  With fewer than 10 / (1 - quantile) normal windows (1,000 at 0.99, so
  that ten lie above the quantile) it stays as learned: a span too short for the
  stream's rate (preflight warns) or one alerts held open, not a stop.
- Once: re-baselining (a new learning period) starts a new refinement; the refined
  threshold is saved with the baseline and restored after a restart.
- Resumed: a refinement under way is saved with the baseline (`progress`: the running
  time so far and the counts, tied to the model's sha256 as the baseline is), so a
  restart, a reload or an idle stream's eviction takes it up where the last save left
  it, the time the stream was away counting as a stop.  It runs on with the config it
  restarts with.
- Exact: a block a stream ingests ends before its first sample at or after the span's
  end (`room`), stops are found sample by sample in the order samples come, and windows
  are counted as they are ingested and judged, so the daemon fed one sample at a time
  and a file job in chunks switch at the same window.  A daemon's few samples a step are
  checked in Python floats: while a refinement is due, numpy calls on two-sample arrays
  would cost about 10 µs a step.
"""
from __future__ import annotations

import math

import numpy as np

from .config import RefineConfig
from .sample_clock import FEW

BINS = 300
LOWEST = -3.0       # log10 of the lowest bin's lower edge, as a share of the threshold
_EDGES = np.logspace(LOWEST, 0.0, BINS + 1)


def needed(quantile: float) -> int:
    """Normal windows a refinement needs: ten above the quantile."""
    return math.ceil(10.0 / (1.0 - quantile) - 1e-9)


def _first_at(el: np.ndarray, x: float) -> int | None:
    """The index of the first elapsed time >= x, or None."""
    if len(el) <= FEW:
        return next((i for i, v in enumerate(el.tolist()) if v >= x), None)
    hit = el >= x
    return int(hit.argmax()) if hit.any() else None


def check_progress(d) -> None:
    """A saved refinement under way (`Refiner.progress`); ValueError when malformed."""
    if not isinstance(d, dict) or type(d.get("ran")) not in (int, float) \
            or not 0 <= d["ran"] < math.inf:
        raise ValueError(f"'refining' is {d!r}, expected {{'ran': seconds >= 0, 'counts': "
                         f"[{BINS} counts]}}")
    c = d.get("counts")
    if c is not None and (not isinstance(c, list) or len(c) != BINS or not all(
            type(x) is int and 0 <= x < 2 ** 31 for x in c)):
        raise ValueError(f"'refining.counts' must be {BINS} whole numbers >= 0")


class Refiner:
    __slots__ = ("cfg", "quantile", "start", "_from", "end", "_counts", "passed", "_taken",
                 "_judged", "_first", "_ran", "_newest", "_lost")

    def __init__(self, cfg: RefineConfig, quantile: float, progress: dict | None = None):
        self.cfg, self.quantile = cfg, quantile
        self.start: float | None = None       # elapsed time the running time counts from
        self._from = self.end = math.inf      # the span, once `start` is known; stops move it
        self._counts: np.ndarray | None = None
        self._ran = 0.0                       # running time before `start` (a restart's)
        if progress is not None:
            self._ran = float(progress["ran"])
            if progress.get("counts") is not None:
                self._counts = np.asarray(progress["counts"], np.int32)
        self._newest = -math.inf              # the newest elapsed time taken
        self._lost = 0.0                      # elapsed time the stops took, since `start`
        self.passed = False                   # a sample at or after the span's end was taken
        self._taken = self._judged = 0        # windows ingested, and judged, since creation
        self._first: int | None = None        # the first window after the span's end

    def progress(self) -> dict:
        """What a restart needs to resume it (check_progress)."""
        ran = self._ran if self.start is None else self._newest - self.start - self._lost
        out = {"ran": ran}
        if self._counts is not None:
            out["counts"] = self._counts.tolist()
        return out

    def room(self, el: np.ndarray, gap: float | None) -> int:
        """How many of these samples (their elapsed times) one block may hold: those
        before the first at or after the span's end; all once the span has passed.  `gap`:
        the stream's gap rule (None: no gap is a stop).  The samples allowed are taken."""
        if self.start is None:
            self._newest = float(el[0])
            self.start = self._newest - self._ran
            self._from = self.start + self.cfg.after_s
            self.end = self._from + self.cfg.span_s
        if self.passed:
            return len(el)
        i = self._walk(el, gap)
        if i == 0:
            self.passed = True
        return len(el) if not i else i

    def _walk(self, el: np.ndarray, gap: float | None) -> int | None:
        """The index of the first sample at or after the span's end, or None; the samples
        before it are taken: the newest time, and the stops among them."""
        if len(el) > FEW:
            run = np.fmax.accumulate(np.concatenate(([self._newest], el)))
            if gap is None or not (el - run[:-1] > gap).any():      # no stop: the usual block
                i = _first_at(el, self.end)
                self._newest = float(run[len(el) if i is None else i])
                return i
        for i, v in enumerate(el.tolist()):
            if gap is not None and v - self._newest > gap:
                self._stopped(v - self._newest)     # running time stands still: never the end
            elif v >= self.end:
                return i
            if v > self._newest:
                self._newest = v
        return None

    def _stopped(self, d: float) -> None:
        """A stop of d seconds: the span waits for the stream to run again.  Windows taken
        before it may be judged after it: a span already started keeps its start."""
        self._lost += d
        if self._newest < self._from:
            self._from += d
        self.end += d

    def took(self, windows: int) -> None:
        """An ingested block (the samples `room` allowed) made this many windows."""
        if self.passed and self._first is None:
            self._first = self._taken
        self._taken += windows

    def due(self) -> bool:
        """The next windows to judge come from samples at or after the span's end:
        refine before judging them."""
        return self._first is not None and self._judged >= self._first

    def dropped(self, windows: int) -> None:
        """Windows that could not be judged (a bug's, logged): counted as judged."""
        self._judged += windows

    def keep(self, el: np.ndarray, scores: np.ndarray, threshold: float,
             normal: np.ndarray) -> None:
        """Judged windows; those in the span that were normal are counted by score /
        threshold (< 1)."""
        self._judged += len(el)
        if _first_at(el, self._from) is None:       # all before the span (or no span yet)
            return
        sel = normal & (el >= self._from) & (el < self.end)
        if not sel.any():
            return
        if self._counts is None:
            self._counts = np.zeros(BINS, np.int32)
        r = np.log10(np.maximum(scores[sel] / threshold, 10.0 ** LOWEST))
        i = np.minimum(((r - LOWEST) * (BINS / -LOWEST)).astype(np.int64), BINS - 1)
        self._counts += np.bincount(i, minlength=BINS).astype(np.int32)

    def refined(self, threshold: float) -> tuple[float | None, int]:
        """(the refined threshold, or None where it stays; the normal windows counted)."""
        c = self._counts
        n = int(c.sum()) if c is not None else 0
        if n < needed(self.quantile):
            return None, n
        k = int(np.searchsorted(np.cumsum(c), self.quantile * n, side="left"))
        new = float(_EDGES[k + 1]) * threshold * self.cfg.margin
        return (new if new < threshold else None), n
