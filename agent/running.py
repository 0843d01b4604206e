"""Whether the machine runs: samples taken while it is stopped are not judged (`running:`).

A model learns a machine's normal *running*.  A pump stopped at the end of a shift, or a
press idle over a weekend, reads nothing like it (no flow, no current, cooling
temperatures), so without this every planned stop opened an alert that stood for the
whole stop and its restart: on the SKAB normal run with a one-hour stop cut in, one alert
of 80 minutes (docs/RESULTS.md, twenty-second session).  ISA-18.2 calls the remedy
state-based (designed) suppression: alarms that mean nothing in an equipment state are
not raised in it.

The rule, on the raw value of one channel (`running.channel` above `running.above`, or
below `running.below`):
- the first sample that fails the condition stops the stream at once: it and the samples
  after it are not learned from, scored or adapted to, the stream shows `idle`, and an
  open alert ends (reason `idle`: the machine stopped, which an operator sees anyway).
  At once, because the stopping transient itself would otherwise be judged;
- judging resumes when the condition has held for `running.start_s` of sample time (the
  machine's start-up and warm-up, which its normal running does not contain), with a new
  window, smoothing and k-of-n history: no window mixes a stop with running;
- a sample whose run channel has no value (NaN) keeps the state the stream is in.

Nothing is learned while idle, so the baseline after a stop is the one before it: a
machine that comes back to its usual running is judged against its usual running.
"""
from __future__ import annotations

import numpy as np

from .config import RunningConfig


class RunGate:
    """One stream's running state.  `split` reads the offered samples without changing
    anything; `take` commits the samples the stream took, so samples offered again (a
    stream that takes fewer than offered) are judged once."""
    __slots__ = ("channel", "above", "below", "start_s", "since", "idle", "stopped", "rule",
                 "_on_split")

    def __init__(self, cfg: RunningConfig, channel: int):
        self.channel, self.above, self.below = channel, cfg.above, cfg.below
        self.start_s = cfg.start_s
        self.rule = condition(cfg.channel, cfg.above, cfg.below)
        self.since: float | None = None     # sample time the condition began to hold
        self.idle = False                   # its samples are not judged
        self.stopped = 0.0                  # elapsed time it last went idle
        self._on_split: np.ndarray | None = None    # the last split's condition per sample

    def _on(self, values: np.ndarray) -> np.ndarray:
        """The condition per sample; a NaN carries the one before it (before any sample,
        a stream that is not idle counts as running)."""
        v = values[:, self.channel].astype(np.float64)
        gone = np.isnan(v)
        on = (v > self.above) if self.above is not None else (v < self.below)
        if gone.any():
            idx = np.maximum.accumulate(np.where(gone, 0, np.arange(1, len(v) + 1)))
            before = self.since is not None or not self.idle
            on = np.r_[before, on][idx]
        return on

    def _held(self, ts: np.ndarray, on: np.ndarray) -> np.ndarray:
        """Per sample: the condition has held for start_s of sample time (a run of "on"
        that began in an earlier block began at `since`)."""
        ext_on = np.r_[self.since is not None, on]
        ext_ts = np.r_[0.0 if self.since is None else self.since, ts]
        began = ext_on & ~np.r_[False, ext_on[:-1]]
        first = np.maximum.accumulate(np.where(began, np.arange(len(ext_on)), 0))
        return on & (ts - ext_ts[first[1:]] >= self.start_s)

    def split(self, ts: np.ndarray, values: np.ndarray) -> tuple[int, bool]:
        """(n, judged): the first n samples are all judged or all not.  `ts`: the stream's
        elapsed times (agent/sample_clock.py), as every time gate's: a device clock's step
        back does not hold a running machine idle."""
        on = self._on_split = self._on(values)
        judged = self._held(ts, on)
        if not self.idle:       # judging goes on until the condition first fails
            off = np.flatnonzero(~on)
            judged[:off[0] if len(off) else len(on)] = True
        change = np.flatnonzero(judged != judged[0])
        return (int(change[0]) if len(change) else len(ts)), bool(judged[0])

    def take(self, ts: np.ndarray) -> None:
        """Commit the first len(ts) samples of the last `split`, which the stream took
        (`idle` is the stream's to set: agent/stream_status.py)."""
        on = self._on_split[:len(ts)]
        if not on[-1]:
            self.since = None
        elif self.since is None or not on.all():
            off = np.flatnonzero(~on)
            self.since = float(ts[off[-1] + 1] if len(off) else ts[0])


def condition(channel: str, above: float | None, below: float | None) -> str:
    """A run condition as logs and messages name it: `Current > 0.2`."""
    return f"{channel} > {above:g}" if above is not None else f"{channel} < {below:g}"


def rule(text: str, start_s: float | None = None) -> dict:
    """`CHANNEL>LEVEL` or `CHANNEL<LEVEL` (replay's and evaluate's --running) as a `running`
    section; ValueError saying the form."""
    for op, key in ((">", "above"), ("<", "below")):
        name, sep, level = text.rpartition(op)
        if sep and name.strip():
            try:
                return {"channel": name.strip(), key: float(level),
                        **({"start_s": start_s} if start_s is not None else {})}
            except ValueError:
                break
    raise ValueError(f"--running {text!r}: expected CHANNEL>LEVEL or CHANNEL<LEVEL "
                     f"(e.g. 'Current>0.2')")


def channel_of(cfg: RunningConfig, channels: list[str]) -> int:
    """The index of `running.channel` among the model's channels; ValueError naming them."""
    if cfg.channel not in channels:
        raise ValueError(f"running.channel: {cfg.channel!r} is not one of the model's "
                         f"channels ({', '.join(channels)})")
    return channels.index(cfg.channel)
