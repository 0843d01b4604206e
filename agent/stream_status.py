"""What a stream shows: its state, why it gave no score yet, and `no_data`.

A stream scores a window only when every channel has a value in it: the ring forward-fills
a missing value for up to `buffer.ffill_max` samples and drops every window still holding
one (agent/ring.py).  A channel that is never sent, or null/NaN for longer, leaves every
window unscored.  Once a channel has had no value for a whole window (the model's, in
samples) past the forward fill, the stream shows `no_data` and names the channel(s): on its
state topic, in health (`missing_channels`), Prometheus and Home Assistant, with one
WARNING.  It shows its verdict again (one INFO) at the next window scored, a window after
the channel is back.  Before, it would have kept showing `normal`, unjudged for hours.

Why a window past the fill and not the first dropped window: a dropout a little longer than
the fill already leaves a window of windows unscored after the channel is back (each one
holding the gap); showing `no_data` then would flap the state and the log at every short
dropout.  A channel gone for a window is down, not dropping out.

Why not an alert: an alert says the process is abnormal (its score, its top channels, the
k-of-n that opened it, an acknowledgement); a dead transmitter is an instrument fault, a
diagnostic that ISA-18.2 keeps apart from process alarms, and no score exists to put in
one.  An alert already open stays open, and the state `anomaly`: it cannot have cleared
while nothing is judged.  A dashboard alerts on the state (README: Troubleshooting).
"""
from __future__ import annotations

import logging

from .bad_input import BadInput, named

log = logging.getLogger("tsad.stream")

NO_DATA = "no_data"
# the missing channels health and Prometheus name (health also counts them all): a
# 300-channel model with most of its tags gone made each stream's health entry 4 KB,
# and Prometheus a series per channel (the wide-stream audit)
LISTED = 10
# every state a stream shows (`StreamStatus.state`), for those that list them: Home
# Assistant's enum sensor, Prometheus' tsad_stream_state
STATES = ("learning", "warming_up", "normal", "anomaly", NO_DATA, "idle")


class StreamStatus:
    """The part of agent/stream.py's Stream that says what it shows (a base class, so that
    stream.py stays within its size)."""
    # no_data: the channels named while it shows no_data, else (); _flaps: its log lines'
    # throttle, made at the first no_data (a loose connector flapping at 20 Hz logged 900
    # lines an hour; now as bad input is: agent/bad_input.py)
    __slots__ = ("no_data", "_flaps")

    @property
    def state(self) -> str:
        # "warming_up": built anew (a start, a reload) with a baseline, no window judged yet;
        # "normal" would say that a fault still there had cleared
        if self.gate is not None and self.gate.idle:
            return "idle"
        if self.baseline.learning:
            return "learning"
        if self.no_data and self.tracker.state != "anomaly":
            return NO_DATA
        return self.tracker.state if self.judged else "warming_up"

    def pending(self) -> dict:
        """Why the stream gave no score yet: {"status": "learning" | "warming_up" |
        "skipped", "needed": samples still needed (null when the learning period is set
        by time)}."""
        if self.baseline.learning:
            return {"status": "learning", "needed": self.baseline.needed}
        need = self.ring.window - self.ring.filled
        if need > 0:
            return {"status": "warming_up", "needed": need}
        # a full window that still holds a value the forward fill could not cover
        return {"status": "skipped", "needed": 1}

    def go_idle(self, at: float) -> dict | None:
        """The machine stopped at elapsed time `at` (agent/running.py): its samples are not
        judged until it runs again; the end event of an open alert (reason "idle"), or None."""
        self.gate.idle, self.gate.stopped = True, at
        ev = self.tracker.close(self.last_ts, self.threshold, "idle")
        self.entered.append("idle")
        if (more := self._flap("idle")) is not None:
            log.info("stream %s: the machine stopped (not %s): its samples are not judged "
                     "until it has run %g s%s%s", self.id, self.gate.rule, self.gate.start_s,
                     f"; alert {ev['id']} ended" if ev else "",
                     f"; {more} more stop(s) since the last such line" if more else "")
        return ev

    def took_idle(self, ts) -> None:
        """Samples of a stopped machine: not judged, but received (its sample count, clock
        and newest time go on)."""
        self._took(ts)

    def resume(self, at: float) -> None:
        """It runs again, judged from elapsed time `at`: from a new window, smoothing and
        k-of-n history, `warming_up` until the first verdict; a learning period set by
        duration does not count the stop (a stop at a shift's end ate it)."""
        self.gate.idle = False
        self.baseline.pause(at - self.gate.stopped)
        self.ring.reset()
        self.smoother.reset()
        self.tracker.restart()
        self.no_data, self.judged = (), False
        self.entered.append(self.state)
        if (more := self._flap("running")) is not None:
            log.info("stream %s: the machine runs (%s for %g s): judged again%s", self.id,
                     self.gate.rule, self.gate.start_s,
                     f"; {more} more start(s) since the last such line" if more else "")

    def _watch(self) -> None:
        """After a push: a channel without a value for a window past the fill puts the
        stream in no_data (another one joins the names)."""
        dead = self.ring.dead()
        if not dead:
            return
        names = [self.tracker.channels[i] for i in dead]
        if self.no_data:
            if not set(names) <= set(self.no_data):
                self.no_data = tuple(dict.fromkeys(self.no_data + tuple(names)))
            elif (more := self._flaps.left_out(self._gone_key())) is not None:
                self._say_gone(more)        # the last time it went was left out; it stays
            return
        was = self.state
        self.no_data = tuple(names)
        if self.state != was:
            self.entered.append(NO_DATA)
        if (more := self._flap(self._gone_key())) is not None:
            self._say_gone(more)

    def _gone_key(self) -> tuple:
        # per set of channels: another channel going is news, the same one again is not
        # (the tuple itself: no string built at every push while the stream has no data)
        return (NO_DATA, self.no_data)

    def _say_gone(self, more: int) -> None:
        log.warning("stream %s: no value from %s for %d samples (buffer.ffill_max %d plus a "
                    "window): no window can be scored; state no_data until one is (health "
                    "missing_channels)%s", self.id, named(list(self.no_data)),
                    self.ring.ffill_max + self.ring.window, self.ring.ffill_max,
                    f"; {more} more time(s) since the last such line" if more else "")

    def _flap(self, key) -> int | None:
        if self._flaps is None:
            self._flaps = BadInput(None, self.id)
        return self._flaps.may_log(key)

    def _scored(self) -> bool:
        """A window was concluded: no_data ends if the ring has dropped none since.  True
        when the state shown was no_data (its verdict is shown again)."""
        if not self.no_data:
            if self._flaps is not None and (more := self._flaps.left_out("scored")) is not None:
                self._say_back(more)        # the last return was left out; it lasts
            return False
        if self.ring.unscored:
            return False
        shown = self.state == NO_DATA
        if (more := self._flap("scored")) is not None:
            self._say_back(more)
        self.no_data = ()
        return shown

    def _say_back(self, more: int) -> None:
        log.info("stream %s: windows are scored again%s: no_data ends%s", self.id,
                 f" ({named(list(self.no_data))} back)" if self.no_data else "",
                 f"; {more} more time(s) since the last such line" if more else "")


def unscored(st) -> dict:
    """A file job's account of the windows stream `st` (None: none was made) left unscored:
    {"windows": dropped, "missing": {channel: its samples the forward fill left empty}}."""
    if st is None:
        return {"windows": 0, "missing": {}}
    left = st.ring.unfilled
    missing = {} if left is None else {c: int(n) for c, n in zip(st.tracker.channels, left) if n}
    return {"windows": st.ring.skipped, "missing": missing}


def unscored_text(u: dict) -> str:
    """`unscored` as a clause of a summary line ("" when every window was scored)."""
    if not u["windows"]:
        return ""
    why = ", ".join(f"{c} on {n} samples" for c, n in u["missing"].items())
    return f"{u['windows']} window(s) unscored (no value past the forward fill: {why})"
