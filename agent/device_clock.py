"""What a decoder remembers about each stream's device clock.

A device timestamp is refused (`bad_timestamp`), so that a corrupted digit costs one
sample instead of resetting, freezing or fast-forwarding the window and the stream's
time gates, when it is
- more than BACKWARD_TOLERANCE_S behind the newest one the stream accepted;
- further ahead of that one than the real time since it came (this machine's monotonic
  clock) plus a tolerance: JUMP_S, or JUMP_STEPS sampling intervals (the last one seen)
  where that is more, so a logger that uploads an hour of 5-minute samples in one burst
  is not mistaken for a step, nor a recording published faster than real time.  A gap
  (a device switched off for a day) has real time behind it and passes;
- more than FUTURE_TOLERANCE_S ahead of this machine's clock.
A device whose clock really stepped is followed after RESYNC_AFTER consecutive samples
that agree with each other, so a stream is never left blind for the length of a step.
That includes a device far ahead of this machine: a Raspberry Pi has no real-time clock,
and without NTP it runs on the time it was last shut down (fake-hwclock), days behind a
device whose own clock is right.  The device's lead over this machine is then allowed
for, and it shrinks back as this machine's clock is put right.  This memory (and the CSV
`auto` decision, with its held lines: csv_auto.py) is kept for the MAX_TRACKED_STREAMS
streams seen most recently: a flood of topic-named streams cannot grow it without bound.
"""
from __future__ import annotations

from collections import OrderedDict

# NTP steps and sampling jitter move a clock back by well under a second.
BACKWARD_TOLERANCE_S = 1.0
# A device sending local time as if it were UTC is up to 14 h ahead; that is a
# configuration fault the operator can see in the alert times, not corruption.
FUTURE_TOLERANCE_S = 86_400.0
# Network and broker delays bunch samples together by seconds, and a device's clock
# drifts by well under a second a day: a minute ahead of real time is a step.
JUMP_S = 60.0
JUMP_STEPS = 10
RESYNC_AFTER = 5                # consecutive stepped samples that mean a real clock step
MAX_TRACKED_STREAMS = 4096      # per-stream clocks kept (least recently seen dropped)


class Clock:
    __slots__ = ("last", "mono", "step", "lead", "behind", "behind_t", "behind_mono", "ahead",
                 "ahead_t", "ahead_mono", "has_ts", "held")

    def __init__(self, has_ts: bool | None = None) -> None:
        self.last: float | None = None     # newest accepted device timestamp
        self.mono = 0.0                    # this machine's monotonic time when it came
        self.step = 0.0                    # the last interval between accepted samples
        self.lead = 0.0                    # a followed device's lead over this machine
        self.behind = 0                    # consecutive samples refused as backward
        self.behind_t = self.behind_mono = 0.0     # the newest of them, and when it came
        self.ahead = 0                     # consecutive samples refused as ahead
        self.ahead_t = self.ahead_mono = 0.0   # the newest of them, and when it came
        # CSV: whether lines start with a timestamp; None while `auto` has not decided
        self.has_ts = has_ts
        self.held: list | None = None      # CSV `auto`: lines held until a decision

    def judge(self, t: float, now: float, mono: float) -> tuple[str | None, str | None]:
        """(why `t` is refused, or None; what was followed, for a warning, or None) for a
        sample stamped `t` that came at `now` (wall) / `mono` (monotonic)."""
        if _beyond_lead(t, now, self.lead):
            return self._ahead(t, mono, f"{(t - now) / 3600:.1f} h ahead of this clock",
                               lambda: self._lead_from(t - now))
        last = self.last
        if last is None:
            return None, None
        if self._back(t):
            self.behind = self.behind + 1 if self.behind and self._agrees(
                t, self.behind_t, self.behind_mono, mono) else 1
            self.behind_t, self.behind_mono = t, mono
            if self.behind < RESYNC_AFTER:
                return f"{last - t:.3f} s behind the stream", None
            self.last = None
            return None, f"device clock stepped back {last - t:.3f} s; following it"
        if self._jumps(t, mono):
            return self._ahead(t, mono, f"{t - last:.3f} s ahead of the stream",
                               lambda: f"device clock stepped forward {t - last:.3f} s; "
                                       "following it")
        return None, None

    def plain(self, t: float, mono: float) -> bool:
        """Whether `judge` takes `t` as it is, this machine's clock aside: no step pending
        or begun by it (the CSV block reader leaves any other stream to the line reader)."""
        return not (self.ahead or self.behind) and (
            self.last is None or not (self._back(t) or self._jumps(t, mono)))

    def lead_allows(self, ts: list[float], arrivals: list[float]) -> bool:
        """Whether samples `ts` that came at `arrivals` (wall) keep within this machine's
        clock and the device's lead, as `keep` shrinks the lead sample by sample."""
        lead = self.lead
        for t, now in zip(ts, arrivals):
            if _beyond_lead(t, now, lead):
                return False
            lead = _shrunk(lead, t, now)
        return True

    def _back(self, t: float) -> bool:
        return t < self.last - BACKWARD_TOLERANCE_S

    def _jumps(self, t: float, mono: float) -> bool:
        return bool(self.step) and t - self.last > mono - self.mono + self.tolerance()

    def tolerance(self) -> float:
        """How far ahead of real time a sample may come before it is a clock step."""
        return max(JUMP_S, JUMP_STEPS * self.step)

    def _agrees(self, t: float, before: float, then: float, mono: float) -> bool:
        """Whether `t` goes on from a refused sample stamped `before` that came at `then`:
        a clock that really stepped, not one more corrupted digit."""
        return before - BACKWARD_TOLERANCE_S <= t <= before + mono - then + self.tolerance()

    def _ahead(self, t: float, mono: float, why: str, follow) -> tuple[str | None, str | None]:
        agree = self.ahead and self._agrees(t, self.ahead_t, self.ahead_mono, mono)
        self.ahead = self.ahead + 1 if agree else 1
        self.ahead_t, self.ahead_mono = t, mono
        if self.ahead < RESYNC_AFTER:
            return why, None
        self.ahead, self.last = 0, None
        return None, follow()

    def _lead_from(self, lead: float) -> str:
        self.lead = lead
        return (f"this machine's clock is {lead / 3600:.1f} h behind the device's; following "
                "the device (set this machine's clock: NTP, or a real-time clock)")

    def keep(self, t: float, now: float, mono: float) -> None:
        """A sample stamped `t` that came at `now` / `mono` was accepted whole."""
        self.behind = self.ahead = 0
        if self.last is None or t > self.last:
            if self.last is not None:
                self.step = t - self.last
            self.last = t
        self.mono = mono
        if self.lead:       # this machine's clock put right: the allowance goes with it
            self.lead = _shrunk(self.lead, t, now)


def _beyond_lead(t: float, now: float, lead: float) -> bool:
    """A sample stamped `t` that came at `now` is further ahead of this machine's clock
    than a day, or than a followed device's `lead` on top of it."""
    return t > now + FUTURE_TOLERANCE_S + lead


def _shrunk(lead: float, t: float, now: float) -> float:
    """A followed device's lead once a sample stamped `t` came at `now`."""
    return max(0.0, min(lead, t - now))


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
