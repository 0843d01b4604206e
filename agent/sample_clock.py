"""A stream's elapsed time: its sample timestamps with the clock's steps taken out.

The time gates of a stream are durations of its sample time: the cooldown after an
alert, a shelve, the update interval and the standing span of an open alert (agent/
alerts.py), a learning period set by `calibration.duration_s` (agent/baseline.py), a
threshold refinement's span (agent/refine.py).  A clock that steps back (NTP, an RTC
reset: agent/device_clock.py follows a device's step after RESYNC_AFTER samples) left
them anchored to the old, later clock: a step back of a day blocked every new alert for a
day.  One that steps forward ended them at once: NTP setting a Pi without an RTC forward
two days after boot ended a 10-minute learning period of a stream stamped on arrival
(by this machine's clock, which no decoder judges) after 7 s.  So each stream keeps an
`offset`, the sum of the steps it has taken out, and its gates run on
`elapsed = ts + offset`:

- a sample more than STEP_S behind the newest one since the last step back is a clock
  step back: the offset grows by the difference, so elapsed time stands still across the
  step and every gate keeps the time it had left, now counted on the new clock;
- a smaller step back is jitter (agent/ring.py treats it so too): nothing changes;
- a step forward is told from a gap by real time, which only a live stream has (`arrive`:
  the daemon's MQTT and serial sources, the HTTP API's samples; a device's step the
  decoders followed reaches it as one jump).  A sample is a clock step forward when both
  (1) it is more than `tol` ahead of the newest sample before it, and (2) its elapsed time
  is more than `tol` past `reach`: the newest elapsed time when the stream's previous
  samples arrived, plus the monotonic time since then (a stream's first arrival has none:
  no step).  Elapsed time then goes on from the later of the newest elapsed time and
  `reach`: a gate gets the real time that passed, not the step (a step among samples that
  arrived together also gets their own spacing after it: at most their span too much).
  `tol` is the decoders' tolerance for a device clock's jump (agent/device_clock.py):
  max(JUMP_S, JUMP_STEPS x the stream's sampling interval, given or learned: agent/
  pace.py).  (1) is per jump, so a recording published at 20x real time is never stepped
  however far it runs ahead; (2) lets the samples that arrive together cover the real
  time before them, so a data logger's burst of an hour of 5-minute samples after an
  hour's silence is not stepped either.  A real gap (a device off for two hours) has real
  time behind it and counts as time that passed;
- without real time (file jobs: evaluate, replay, predict, fit-policy, the benchmarks; a
  daemon's replay source) a step forward cannot be told from a gap, so it counts as time
  that passed: it can end a gate early, never keep an alert from opening.

Times shown (an alert's start and end, `shelved_until`) stay the device's own.  The
offset follows the order of the samples and their arrivals, not how they were chunked.
Real time is known per arrival, not per sample: the monotonic time a live source handed
a block over (`Batch.arrived`: MQTT's when the pipeline decodes the messages of its step,
serial's when a read's lines are decoded, HTTP's when a sample is pushed), the latest of
a stream's blocks in one engine step; every sample of an arrival shares it.  So a daemon
fed one sample at a time and in blocks gates on the same elapsed times for the same
arrivals, and a file job's long chunks on those of no arrivals.  A block without a step
costs a few array operations (a few samples: a few comparisons).
"""
from __future__ import annotations

import math

import numpy as np

from .device_clock import BACKWARD_TOLERANCE_S, JUMP_S, JUMP_STEPS

STEP_S = BACKWARD_TOLERANCE_S      # further back than this is a clock step, not jitter
FEW = 8                             # blocks up to this many samples are scanned in Python


class SampleClock:
    __slots__ = ("offset", "newest", "at", "reach", "tol")

    def __init__(self) -> None:
        self.offset = 0.0           # the steps taken out so far, summed
        self.newest = -math.inf     # the newest sample time since the last step back
        self.at: float | None = None    # monotonic time of the latest arrival
        self.reach = math.inf       # the elapsed time real time explains (inf: not known)
        self.tol = JUMP_S

    def arrive(self, at: float | None, interval: float | None) -> None:
        """The samples that follow were handed over at monotonic time `at` (None: no real
        time, a file); `interval`: the stream's sampling interval, if known."""
        if at is None:
            self.reach = math.inf
        elif at != self.at:     # a new arrival: the real time since the last one
            self.reach = math.inf if self.at is None or self.newest == -math.inf else \
                self.newest + self.offset + max(0.0, at - self.at)
            self.at = at
        self.tol = max(JUMP_S, JUMP_STEPS * interval) if interval else JUMP_S

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
        # past `ahead` a sample may step forward: _steps judges it (inf: never)
        ahead = self.reach + self.tol - self.offset
        if n <= FEW:    # a daemon's few samples a step: Python floats beat numpy calls
            for t in ts.tolist():
                if t < newest - STEP_S or t > ahead:
                    return self._steps(ts)
                if t > newest:
                    newest = t
            return self.offset, newest, self.offset
        # fmax: a NaN time (no decoder lets one through) neither steps nor sticks
        run = np.fmax(np.fmax.accumulate(ts), newest)
        if not (ts[0] < newest - STEP_S or np.less(ts[1:], run[:-1] - STEP_S).any()
                or run[-1] > ahead):
            return self.offset, float(run[-1]), self.offset
        return self._steps(ts)

    def _steps(self, ts: np.ndarray) -> tuple[np.ndarray, float, float]:
        """A block that steps, or may step forward, sample by sample (rare, or a live
        block ahead of real time: a few samples a step; Python is fine)."""
        off = np.empty(len(ts))
        offset, newest, reach, tol = self.offset, self.newest, self.reach, self.tol
        for i, t in enumerate(ts.tolist()):
            if t < newest - STEP_S:
                offset += newest - t
                newest = t
            elif t > newest:
                if t - newest > tol and t + offset > reach + tol:
                    offset = max(newest + offset, reach) - t
                newest = t
            off[i] = offset
        return off, newest, offset
