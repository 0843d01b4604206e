"""A stream's elapsed time: its sample timestamps with the device clock's steps back
taken out.

The time gates of a stream are durations of its sample time: the cooldown after an
alert, a shelve, the update interval and the standing span of an open alert (agent/
alerts.py), a learning period set by `calibration.duration_s` (agent/baseline.py).
A device clock that steps back (NTP, an RTC reset: agent/device_clock.py follows it
after RESYNC_AFTER samples) left them anchored to the old, later clock: a step back of
a day blocked every new alert for a day, an RTC reset to 2000 for decades, and a
shelve outlived its one-week cap.  So each stream keeps an `offset`, the sum of the
steps back it has taken, and its gates run on `elapsed = ts + offset`:

- a sample more than STEP_S behind the newest one since the last step is a clock step
  back: the offset grows by the difference, so elapsed time stands still across the
  step and every gate keeps the time it had left, now counted on the new clock;
- a smaller step back is jitter (agent/ring.py treats it so too): nothing changes;
- a step forward cannot be told from a gap (a device switched off for a day), so it
  counts as time that passed: it can end a gate early, never keep an alert from opening.

Times shown (an alert's start and end, `shelved_until`) stay the device's own.  The
offset follows the order of the samples, not how they were chunked, so a daemon fed
one sample at a time and a file job's long chunks gate on the same elapsed times.  A
block without a step back costs a few array operations (a few samples: a few comparisons).
"""
from __future__ import annotations

import math

import numpy as np

from .device_clock import BACKWARD_TOLERANCE_S

STEP_S = BACKWARD_TOLERANCE_S      # further back than this is a clock step, not jitter
FEW = 8                             # blocks up to this many samples are scanned in Python


class SampleClock:
    __slots__ = ("offset", "newest")

    def __init__(self) -> None:
        self.offset = 0.0           # the steps back taken so far, summed
        self.newest = -math.inf     # the newest sample time since the last step back

    def peek(self, ts: np.ndarray) -> float | np.ndarray:
        """The offset of each sample of the block `ts` (one float when they share one),
        as if it were taken; nothing changes."""
        return self._scan(ts)[0]

    def take(self, ts: np.ndarray) -> float | np.ndarray:
        """`peek`, and the block's samples are taken."""
        off, self.newest, self.offset = self._scan(ts)
        return off

    def _scan(self, ts: np.ndarray) -> tuple[float | np.ndarray, float, float]:
        """(offsets, newest, offset after the block)."""
        n, newest = len(ts), self.newest
        if n == 0:
            return self.offset, newest, self.offset
        if n <= FEW:    # a daemon's few samples a step: Python floats beat numpy calls
            for t in ts.tolist():
                if t < newest - STEP_S:
                    return self._steps(ts)
                if t > newest:
                    newest = t
            return self.offset, newest, self.offset
        # fmax: a NaN time (no decoder lets one through) neither steps nor sticks
        run = np.fmax(np.fmax.accumulate(ts), newest)
        if not (ts[0] < newest - STEP_S or np.less(ts[1:], run[:-1] - STEP_S).any()):
            return self.offset, float(run[-1]), self.offset
        return self._steps(ts)

    def _steps(self, ts: np.ndarray) -> tuple[np.ndarray, float, float]:
        """A block that steps back, sample by sample (rare: Python is fine)."""
        off = np.empty(len(ts))
        offset, newest = self.offset, self.newest
        for i, t in enumerate(ts.tolist()):
            if t < newest - STEP_S:
                offset += newest - t
                newest = t
            elif t > newest:
                newest = t
            off[i] = offset
        return off, newest, offset
