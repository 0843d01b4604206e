"""Shelves that outlive the process and the streams: `<state_dir>/shelves.json`.

A shelve is an operator's decision with an end (ISA-18.2): a restart, or a reload that
builds the streams anew, must not lift it, or alerts open in the middle of the
maintenance it was set for.  Each shelve is kept as the wall time it ends, on the
agent's clock: while the agent is away no sample tells the time.  When the streams are
built again, each shelve still in force is given again for the time it has left (at most
the week a command may ask for, whatever the wall clock did meanwhile), which
runs on the wall clock until the stream's first sample and on sample time from then on
(`Stream.shelve`).  A topic-named stream gets its shelve back when its first sample has
made it, and so does a stream dropped while silent (`buffer.idle_evict_s`) when it returns.

Rules: a file that cannot be read or is malformed is logged and ignored (no shelve is
better than a crash loop); a write that fails is logged and the book goes on in memory.
Writes are atomic (state_store.write_json).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from .commands import MAX_SHELVE_S
from .state_store import write_json

log = logging.getLogger(__name__)

FILE = "shelves.json"


class ShelfBook:
    def __init__(self, state_dir: str | Path | None) -> None:
        self.path = Path(state_dir) / FILE if state_dir else None
        self.ends: dict[str, float] = self._load()
        self.waiting: set[str] = set()     # shelves whose stream has not appeared yet

    def keep_in(self, state_dir: str | Path | None) -> None:
        """Keep the book in `state_dir` from now on (a reload may move it)."""
        path = Path(state_dir) / FILE if state_dir else None
        if path != self.path:
            self.path = path
            self._write()

    def _load(self) -> dict[str, float]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            ends = json.loads(self.path.read_text())["ends"]
            if not all(type(v) in (int, float) and math.isfinite(v) for v in ends.values()):
                raise ValueError("a shelve's end is not a number")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("%s: cannot be read (%s); no shelve is restored", self.path, e)
            return {}
        now = time.time()
        return {sid: end for sid, end in ends.items() if end > now}

    def _write(self) -> None:
        if self.path is None:
            return
        try:
            write_json(self.path, {"ends": self.ends})
        except OSError as e:
            log.warning("%s: cannot be written (%s); the shelves are kept in memory only",
                        self.path, e)

    def record(self, sid: str, for_s: float) -> None:
        """A shelve command carried out (`for_s` 0: an unshelve)."""
        if for_s > 0:
            self.ends[sid] = time.time() + for_s
        else:
            self.ends.pop(sid, None)
        self.waiting.discard(sid)
        self._write()

    def hold(self, sid: str, for_s: float) -> float | None:
        """A shelve command (`for_s` 0: an unshelve) for a stream not running now: the
        wall time it ends (None: lifted), given to the stream at its first sample."""
        self.record(sid, for_s)
        if for_s > 0:
            self.waiting.add(sid)
            log.info("stream %s: not running; shelved for %g s, given to it at its first "
                     "sample", sid, for_s)
        return self.ends.get(sid)

    def restore(self, engine) -> None:
        """Give a freshly built engine the shelves still in force."""
        now = time.time()
        self.ends = {sid: end for sid, end in self.ends.items() if end > now}
        self.waiting = {sid for sid in sorted(self.ends) if not self._give(engine, sid)}

    def _give(self, engine, sid: str) -> bool:
        """The shelve of `sid` for the time it has left, at most a week; False when the
        engine has no such stream (yet)."""
        left = min(self.ends.get(sid, 0.0) - time.time(), MAX_SHELVE_S)
        if left <= 0:
            return True
        if engine.shelve(sid, left) is None:
            return False
        log.info("stream %s: shelved again for the %.0f s it had left", sid, left)
        return True

    def evicted(self, sids: list[str]) -> None:
        """Streams dropped for want of samples: a machine shelved for maintenance often
        falls silent, and its stream's return must find the shelve."""
        self.waiting.update(sid for sid in sids if sid in self.ends)

    def forget(self, sids: list[str]) -> None:
        """Streams forgotten for good (agent/departures.py)."""
        if any(sid in self.ends for sid in sids):
            for sid in sids:
                self.ends.pop(sid, None)
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
