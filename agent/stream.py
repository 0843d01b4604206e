"""One stream's detection state and the two halves of its step.

`ingest` takes raw samples: while the baseline is learning it holds them; then they
are scaled and appended to the ring, which returns the windows that fell due.
`conclude` takes those windows' scores: smoothing, the alert tracker, and the result
the sinks see.  The engine runs the model between the two, once for every stream
that has windows due.

A learning period that ends inside `ingest` replays its held samples through the
ring in chunks of at most `max_batch` windows, so a long period (a day at 1 Hz)
never materialises all its windows at once.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .alerts import AlertTracker
from .baseline import Baseline
from .contract import score_windows
from .ring import RingBuffer, Windows
from .scoring import Smoother

log = logging.getLogger("tsad.stream")

PACE_STEPS = 32      # steps that teach a stream its sampling interval
GAP_LOG_S = 600.0    # a stream logs its window restarts at most this often

Infer = Callable[[np.ndarray], np.ndarray]


@dataclass
class StreamResult:
    """What one step produced for one stream: per-window arrays of equal length."""
    stream: str
    ts: np.ndarray          # float64 [k] newest sample of each window
    scores: np.ndarray      # float64 [k] smoothed
    threshold: float
    labels: np.ndarray      # int8 [k] score >= threshold
    alert_open: np.ndarray  # int8 [k] an alert is open at that window
    events: list[dict]      # alert events, in order
    # states the stream entered during the step, in order ("learning", "normal", "anomaly")
    entered: list[str] = field(default_factory=list)


class Pace:
    """A stream's sampling interval, learned from its first PACE_STEPS positive steps (the
    median: jitter and the odd missing sample do not move it) when it was not given;
    once known, a gap longer than `factor` intervals restarts the stream's window."""

    def __init__(self, ring: RingBuffer, factor: float | None, interval: float | None):
        self.ring, self.factor = ring, factor
        self.interval = interval
        self._steps: list[np.ndarray] = []
        self._n = 0
        self._prev = float("nan")
        if interval is not None and factor is not None:
            ring.gap_reset_s = factor * interval

    @property
    def learning(self) -> bool:
        return self.factor is not None and self.interval is None

    def observe(self, ts: np.ndarray, sid: str) -> None:
        d = np.diff(np.concatenate([[self._prev], ts]))
        self._prev = float(ts[-1])
        d = d[d > 0]
        self._steps.append(d)
        self._n += len(d)
        if self._n >= PACE_STEPS:
            self.interval = float(np.median(np.concatenate(self._steps)))
            self._steps = []
            self.ring.gap_reset_s = self.factor * self.interval
            log.info("stream %s: a sample every %.3g s; a gap over %.3g s restarts its window",
                     sid, self.interval, self.ring.gap_reset_s)


class Stream:
    def __init__(self, sid: str, source: str, ring: RingBuffer, smoother: Smoother,
                 baseline: Baseline, tracker: AlertTracker, max_batch: int, pace: Pace):
        self.id, self.source = sid, source
        self.ring, self.smoother, self.baseline, self.tracker = ring, smoother, baseline, tracker
        self.max_batch = max_batch
        self.pace = pace
        self._gap_logged = -np.inf
        self.samples = 0
        self.last_ts = float("nan")     # newest sample time (stamps alerts closed at a stop)
        self.last_seen = 0.0            # monotonic time of the newest batch (idle eviction)
        self.just_learned = False       # set when a learning period ended: the engine saves it
        # states entered since the engine last collected them (see StreamResult.entered)
        self.entered: list[str] = ["learning"] if baseline.learning else []

    @property
    def state(self) -> str:
        return "learning" if self.baseline.learning else self.tracker.state

    @property
    def threshold(self) -> float:
        return self.baseline.threshold

    # ------------------------------------------------------------ step, first half
    def ingest(self, ts: np.ndarray, values: np.ndarray, infer: Infer) -> Windows | None:
        """Raw samples in; the windows now due (scaled), or None."""
        self.samples += len(ts)
        if not len(ts):
            return None
        if self.pace.learning:
            self.pace.observe(ts, self.id)
        self.last_ts = float(ts[-1])
        if self.baseline.learning:
            k = self.baseline.hold(ts, values)
            ts, values = ts[k:], values[k:]
            if self.baseline.period_over:
                self._end_learning(infer)
            if not len(ts):
                return None
        return self._push(ts, self.baseline.scaler.apply(values))

    def _push(self, ts: np.ndarray, scaled: np.ndarray) -> Windows | None:
        resets = self.ring.resets
        w = self.ring.push(ts, scaled)
        if self.ring.resets > resets and time.monotonic() - self._gap_logged > GAP_LOG_S:
            self._gap_logged = time.monotonic()
            log.warning("stream %s: a gap of over %.3g s between samples: its window starts "
                        "again (%d restart(s) so far; counted in health ring_resets)", self.id,
                        self.ring.gap_reset_s, self.ring.resets)
        return w if len(w) else None

    def _end_learning(self, infer: Infer) -> None:
        b = self.baseline
        ts, raw = b.take_held()
        b.fit_scaler(raw, self.id)
        scaled = b.scaler.apply(raw)
        scores = []
        for a in range(0, len(ts), self.max_batch):
            w = self._push(ts[a:a + self.max_batch], scaled[a:a + self.max_batch])
            if w is not None:
                scores.append(self.smoother.update(score_windows(w.x, infer(w.x))[0]))
        if scores:
            b.fit_threshold(np.concatenate(scores))
        else:
            b.fit_threshold(None)
            log.error("stream %s: no complete window of %d samples in its %d learning samples "
                      "(%d window restart(s) after time gaps, %d window(s) skipped for missing "
                      "values); using the threshold %.4g", self.id, self.ring.window, len(ts),
                      self.ring.resets, self.ring.skipped, b.threshold)
        log.info("stream %s: learned its baseline on %d samples, threshold %.4g", self.id,
                 len(ts), b.threshold)
        self.just_learned = True
        self.entered.append("normal")

    # ------------------------------------------------------------ step, second half
    def conclude(self, ts: np.ndarray, scores: np.ndarray, err: np.ndarray) -> StreamResult:
        """Scores of the windows `ingest` returned (raw, unsmoothed) -> the result."""
        s = self.smoother.update(scores)
        thr = self.baseline.threshold
        events = self.tracker.update(ts, s, thr, err)
        self.entered += [("anomaly" if ev["type"] == "new" else "normal") for ev in events
                         if ev["type"] != "update"]
        return StreamResult(self.id, ts, s, thr, self.tracker.labels, self.tracker.open_mask,
                            events)

    def relearn(self) -> dict | None:
        """Forget the baseline and start a new learning period; the end event of an open
        alert (reason "rebaseline"), or None."""
        ev = self.tracker.close(self.last_ts, self.baseline.threshold, "rebaseline")
        self.baseline.relearn()
        self.ring.reset()
        self.smoother.reset()
        if self.baseline.learning:
            self.entered.append("learning")
        elif ev is not None:
            self.entered.append("normal")
        return ev
