"""What operators ask of the engine's streams: re-baseline (or a standing alert does:
`alerts.rebaseline_after_s`), acknowledge, shelve.

A base class of agent/engine.py's Engine (as stream_status.py is of Stream), so that the
engine's module holds the step and the streams' lifecycle.  Each command acts at once,
between steps; the states it makes a stream enter are collected by `take_entered`.

An alert that ended unacknowledged stays the operator's to ack (ISA-18.2's "returned to
normal, unacknowledged": AlertTracker.rtn) when its stream is dropped (idle eviction, a
reload): the engine holds it (`held_rtn`) until acked, the stream returns, or the stream
is forgotten (agent/departures.py); a reload hands them to the next engine.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from .stream import StreamResult

if TYPE_CHECKING:
    from .stream import Stream

log = logging.getLogger("tsad.engine")


class OperatorCommands:
    """Needs the engine's `streams`, `held_rtn`, `admission`, `metrics`, `store` and
    `stream()`."""

    def _commanded(self, sid: str) -> Stream | None:
        """The stream an operator command names.  One the config names is created if no
        sample has yet: Home Assistant shows its buttons from the start."""
        st = self.streams.get(sid)
        if st is None and sid in self.admission.named and (st := self.stream(sid)) is not None:
            st.last_seen = time.monotonic()     # idle from now, not from boot
        return st

    def rebaseline(self, sid: str) -> tuple[bool, dict | None]:
        """Start a new learning period for one stream: (known stream?, end event or None)."""
        st = self._commanded(sid)
        if st is None:
            return False, None
        ev = self._relearn(st)
        log.info("stream %s: re-baselining: a new learning period starts", sid)
        return True, ev

    def _relearn(self, st: Stream) -> dict | None:
        """A new learning period for `st`, its saved baseline deleted: the end event of the
        alert that was open (counted), or None."""
        ev = st.relearn()
        if ev is not None:
            self.metrics.alerts["end"] += 1
        if self.store:
            self.store.forget(st.id)
        return ev

    def ack(self, alert_id: str | None = None, sid: str | None = None) -> dict | None:
        """Acknowledge alert `alert_id`, or stream `sid`'s latest (open, or ended
        unacknowledged): the event that shows it (AlertTracker.ack), or None when no
        stream has it to acknowledge."""
        streams = self.streams.values() if sid is None else \
            [st] if (st := self.streams.get(sid)) is not None else []
        for st in streams:
            ev = st.tracker.ack(alert_id, st.threshold)
            if ev is not None:
                self.metrics.alerts[ev["type"]] += 1
                return ev
        for held, ev in self.held_rtn.items():     # a dropped stream's
            if sid in (None, held) and alert_id in (None, ev["id"]) and held not in self.streams:
                del self.held_rtn[held]
                self.metrics.alerts["end"] += 1
                return {**ev, "acknowledged": True}
        return None

    def ended_unacked(self) -> dict[str, dict]:
        """Stream -> the end event of its alert that ended unacknowledged: what a reload
        hands to the next engine (`held_rtn`) and to rebuilt sinks."""
        return {**self.held_rtn, **{sid: st.tracker.rtn for sid, st in self.streams.items()
                                    if st.tracker.rtn is not None}}

    def _rebaseline_standing(self, st: Stream) -> list[StreamResult]:
        """alerts.rebaseline_after_s: a standing alert ends (reason "rebaseline") and the
        stream learns its new normal."""
        ev = self._relearn(st)
        log.warning("stream %s: its alert stood for alerts.rebaseline_after_s: learning the "
                    "new level as normal", st.id)
        return [] if ev is None else [StreamResult.of_events(st.id, st.threshold, [ev])]

    def shelve(self, sid: str, for_s: float) -> float | None:
        """Stream.shelve on stream `sid`; None for an unknown stream."""
        st = self._commanded(sid)
        if st is None:
            return None
        until = st.shelve(for_s)
        log.info("stream %s: %s", sid, f"shelved for {for_s:g} s" if for_s > 0 else "unshelved")
        return until

    def take_entered(self) -> list[tuple[str, str]]:
        """States streams entered outside a step (a command, a re-baseline), in order."""
        out = [(sid, state) for sid, st in self.streams.items() for state in st.entered]
        for st in self.streams.values():
            st.entered = []
        return out
