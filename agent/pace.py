"""A stream's sampling interval, learned from its first samples when the config does not
give it: adaptation turns time constants into samples with it, and the gap rule
("auto") judges a stream by its own pace."""
from __future__ import annotations

import logging

import numpy as np

from .ring import RingBuffer

log = logging.getLogger("tsad.stream")

PACE_STEPS = 32      # steps that teach a stream its sampling interval


class Pace:
    """A stream's sampling interval, learned from its first PACE_STEPS positive steps (the
    median: jitter and the odd missing sample do not move it) when it was not given.
    Adaptation reads it to turn time constants into samples; with `factor` (gap reset
    "auto"), a gap longer than `factor` intervals restarts the stream's window."""

    __slots__ = ("interval", "_steps", "_n", "_prev", "ring", "factor")

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
        return self.interval is None

    def observe(self, ts: np.ndarray, sid: str) -> None:
        d = np.diff(np.concatenate([[self._prev], ts]))
        self._prev = float(ts[-1])
        d = d[d > 0]
        self._steps.append(d)
        self._n += len(d)
        if self._n >= PACE_STEPS:
            # the first PACE_STEPS steps, however the samples were chunked: a daemon fed
            # one sample at a time and a file job in blocks learn the same interval
            self.interval = float(np.median(np.concatenate(self._steps)[:PACE_STEPS]))
            self._steps = []
            if self.factor is not None:
                self.ring.gap_reset_s = self.factor * self.interval
                log.info("stream %s: a sample every %.3g s; a gap over %.3g s restarts its "
                         "window", sid, self.interval, self.ring.gap_reset_s)
