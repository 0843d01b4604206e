"""What a decoder remembers about each stream's device clock.

A device timestamp is refused (`bad_timestamp`) when it is more than
BACKWARD_TOLERANCE_S behind the newest one the stream accepted, or more than
FUTURE_TOLERANCE_S ahead of this machine's clock: a corrupted digit then costs one
sample instead of resetting or freezing the window.  A device whose clock really
stepped back (NTP, an RTC reset) is followed again after RESYNC_AFTER consecutive
such samples, so a stream is never left blind for the length of the step.  This
memory (and the CSV `auto` decision, with its held lines: csv_auto.py) is kept for the
MAX_TRACKED_STREAMS streams seen most recently: a flood of topic-named streams cannot
grow it without bound.
"""
from __future__ import annotations

from collections import OrderedDict

# NTP steps and sampling jitter move a clock back by well under a second.
BACKWARD_TOLERANCE_S = 1.0
# A device sending local time as if it were UTC is up to 14 h ahead; that is a
# configuration fault the operator can see in the alert times, not corruption.
FUTURE_TOLERANCE_S = 86_400.0
RESYNC_AFTER = 5                # consecutive backward samples that mean a real clock step
MAX_TRACKED_STREAMS = 4096      # per-stream clocks kept (least recently seen dropped)


class Clock:
    __slots__ = ("last", "behind", "has_ts", "held")

    def __init__(self, has_ts: bool | None = None) -> None:
        self.last: float | None = None     # newest accepted device timestamp
        self.behind = 0                    # consecutive samples refused as backward
        # CSV: whether lines start with a timestamp; None while `auto` has not decided
        self.has_ts = has_ts
        self.held: list | None = None      # CSV `auto`: lines held until a decision

    def keep(self, t: float) -> None:
        """A sample stamped `t` was accepted whole."""
        self.behind = 0
        if self.last is None or t > self.last:
            self.last = t


class Clocks:
    """The clocks of the streams seen most recently (an LRU of MAX_TRACKED_STREAMS)."""

    def __init__(self, has_ts: bool | None = None) -> None:
        self._clocks: OrderedDict[str | None, Clock] = OrderedDict()
        self._has_ts = has_ts       # every new clock's: fixed unless `timestamp: auto`

    def get(self, stream: str | None) -> Clock:
        clocks = self._clocks
        c = clocks.get(stream)
        if c is None:
            c = clocks[stream] = Clock(self._has_ts)
            if len(clocks) > MAX_TRACKED_STREAMS:
                clocks.popitem(last=False)
        elif len(clocks) > 1:
            clocks.move_to_end(stream)
        return c
