"""Shelves that outlive the process and the streams: `<state_dir>/shelves.json`.

A shelve is an operator's decision with an end (ISA-18.2): a restart, or a reload that
builds the streams anew, must not lift it, or alerts open in the middle of the
maintenance it was set for.  Within a run a shelve's end is kept on the monotonic clock,
so a step of the wall clock (NTP correcting a Raspberry Pi that booted without a
real-time clock) neither stretches nor lifts it.  The file keeps the wall time each ends
and the length it was asked for: while the agent is away no sample tells the time, and
at the next start the wall clock may itself be wrong.  A shelve read back is given again
for the time it has left by the wall clock, but never more than it was asked for, nor the
week a command may ask for; where the clock is now ahead (a bad fake-hwclock save), it
cannot be told from a long absence, and the shelve has ended.  A stream's shelve runs
on this machine's clock until its first sample and on sample time from then on
(`Stream.shelve`).
A topic-named stream gets its shelve back when its first sample has made it, and so does
a stream dropped while silent (`buffer.idle_evict_s`) when it returns.

Rules: a file that cannot be read or is malformed is logged and ignored (no shelve is
better than a crash loop); a write that fails is logged and the book goes on in memory.
Writes are atomic (state_store.FileWriter).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from .commands import MAX_SHELVE_S
from .state_store import FileWriter

log = logging.getLogger(__name__)

FILE = "shelves.json"


class ShelfBook:
    def __init__(self, state_dir: str | Path | None) -> None:
        self.path = Path(state_dir) / FILE if state_dir else None
        self._file = FileWriter(self.path, "the shelves are") if self.path else None
        self._until: dict[str, float] = {}     # stream -> its shelve's end, monotonic clock
        self._asked: dict[str, float] = {}     # stream -> the length its command asked for
        self._load()
        self.waiting: set[str] = set()     # shelves whose stream has not appeared yet

    @property
    def ends(self) -> dict[str, float]:
        """Each shelve's end by this machine's wall clock now."""
        off = time.time() - time.monotonic()
        return {sid: end + off for sid, end in self._until.items()}

    def __contains__(self, sid: str) -> bool:
        """Whether `sid` has a shelve in the book (in force, or waiting for its stream)."""
        return sid in self._until

    def keep_in(self, state_dir: str | Path | None) -> None:
        """Keep the book in `state_dir` from now on (a reload may move it)."""
        path = Path(state_dir) / FILE if state_dir else None
        if path != self.path:
            self.path = path
            self._write()

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            doc = json.loads(self.path.read_text())
            ends, asked = doc["ends"], doc.get("asked", {})
            if not all(type(v) in (int, float) and math.isfinite(v)
                       for v in (*ends.values(), *asked.values())):
                raise ValueError("a shelve's end or length is not a number")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("%s: cannot be read (%s); no shelve is restored", self.path, e)
            return
        now, mono = time.time(), time.monotonic()
        for sid, end in ends.items():
            left = min(end - now, asked.get(sid, MAX_SHELVE_S), MAX_SHELVE_S)
            if left > 0:
                self._until[sid], self._asked[sid] = mono + left, asked.get(sid, left)

    def _write(self) -> None:
        if self.path is None:
            return
        self._file.write({"ends": self.ends, "asked": self._asked})

    def record(self, sid: str, for_s: float) -> None:
        """A shelve command carried out (`for_s` 0: an unshelve)."""
        if for_s > 0:
            self._until[sid], self._asked[sid] = time.monotonic() + for_s, for_s
        else:
            self._until.pop(sid, None)
            self._asked.pop(sid, None)
        self.waiting.discard(sid)
        self._write()

    def hold(self, sid: str, for_s: float) -> float | None:
        """A shelve command (`for_s` 0: an unshelve) for a stream not running now: the
        wall time it ends (None: lifted), given to the stream at its first sample."""
        self.record(sid, for_s)
        if for_s <= 0:
            return None
        self.waiting.add(sid)
        log.info("stream %s: not running; shelved for %g s, given to it at its first "
                 "sample", sid, for_s)
        return time.time() + for_s

    def restore(self, engine) -> None:
        """Give a freshly built engine the shelves still in force."""
        mono = time.monotonic()
        self._until = {sid: end for sid, end in self._until.items() if end > mono}
        self._asked = {sid: self._asked[sid] for sid in self._until}
        self.waiting = {sid for sid in sorted(self._until) if not self._give(engine, sid)}

    def _give(self, engine, sid: str) -> bool:
        """The shelve of `sid` for the time it has left; False when the engine has no such
        stream (yet)."""
        left = self._until.get(sid, 0.0) - time.monotonic()
        if left <= 0:
            return True
        if engine.shelve(sid, left) is None:
            return False
        log.info("stream %s: shelved again for the %.0f s it had left", sid, left)
        return True

    def evicted(self, sids: list[str]) -> None:
        """Streams dropped for want of samples: a machine shelved for maintenance often
        falls silent, and its stream's return must find the shelve."""
        self.waiting.update(sid for sid in sids if sid in self._until)

    def forget(self, sids: list[str]) -> None:
        """Streams forgotten for good (agent/departures.py)."""
        if any(sid in self._until for sid in sids):
            for sid in sids:
                self._until.pop(sid, None)
                self._asked.pop(sid, None)
            self._write()
        self.waiting.difference_update(sids)

    def catch_up(self, engine, batches) -> None:
        """Before a step: the shelve of a stream whose samples it brings back, given before
        its first sample is judged."""
        for b in batches:
            if b.stream not in self.waiting:
                continue
            src = b.source or b.stream
            # a stream the step will refuse is left to it, which counts the refusal once
            known = b.stream in engine.streams
            if not known and not engine.admission.room(b.stream, src) or \
                    engine.stream(b.stream, src) is None:
                continue
            self.waiting.discard(b.stream)
            self._give(engine, b.stream)
