"""A stream's sampling interval, learned from its first samples when the config does not
give it: adaptation turns time constants into samples with it, and the gap rule
("auto") judges a stream by its own pace."""
from __future__ import annotations

import logging

import numpy as np

from .ring import RingBuffer

log = logging.getLogger("tsad.stream")

PACE_STEPS = 32      # steps that teach a stream its sampling interval
# A stream sampled this many times faster or slower than the model's training rows is
# told so: its windows span another stretch of the process than the model learned, and
# a learning period or policy set in samples lasts another time (a 5 s model's 360-sample
# learning was 6 min at 1 Hz, and a constant valve's std was floored into a false alert).
# Jitter and a missing sample keep a learned median well inside 2x.
RATE_FACTOR = 2.0


def rate_mismatch(interval: float, trained: float | None) -> str | None:
    """What to say when `interval` (s) is more than RATE_FACTOR off the model's training
    interval (metadata training.interval_s), else None."""
    if trained is None or not interval > 0:
        return None
    ratio = interval / trained
    if 1 / RATE_FACTOR <= ratio <= RATE_FACTOR:
        return None
    return (f"a sample every {interval:.3g} s, but the model was trained on rows "
            f"{trained:.3g} s apart ({ratio:.3g}x): its windows cover another span of the "
            f"process than it learned, and a learning period in samples lasts "
            f"{ratio:.3g}x as long in time; retrain the model on data sampled at this "
            f"stream's rate, or resample the stream to {trained:.3g} s")


class Pace:
    """A stream's sampling interval, learned from its first PACE_STEPS positive steps (the
    median: jitter and the odd missing sample do not move it) when it was not given.
    Adaptation reads it to turn time constants into samples; with `factor` (gap reset
    "auto"), a gap longer than `factor` intervals restarts the stream's window."""

    __slots__ = ("interval", "_steps", "_n", "_prev", "ring", "factor", "trained")

    def __init__(self, ring: RingBuffer, factor: float | None, interval: float | None,
                 trained: float | None = None):
        """`trained`: the model's training interval (ModelMeta.interval_s), to which a
        learned interval is compared once (a given one preflight compares at start)."""
        self.ring, self.factor, self.trained = ring, factor, trained
        self.interval = interval
        self._steps: list[np.ndarray] = []
        self._n = 0
        self._prev = float("nan")
        if interval is not None and factor is not None:
            ring.gap_reset_s = factor * interval

    @property
    def learning(self) -> bool:
        return self.interval is None

    @property
    def estimate(self) -> float | None:
        """The interval, or while it is being learned the median step so far (None before
        the first step): enough to tell a slow stream's pause from an outage
        (agent/staleness.py), not to set its gap rule on."""
        if self.interval is not None or not self._n:
            return self.interval
        return float(np.median(np.concatenate(self._steps)))

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
            if (why := rate_mismatch(self.interval, self.trained)) is not None:
                log.warning("stream %s: %s", sid, why)
            if self.factor is not None:
                self.ring.gap_reset_s = self.factor * self.interval
                log.info("stream %s: a sample every %.3g s; a gap over %.3g s restarts its "
                         "window", sid, self.interval, self.ring.gap_reset_s)
