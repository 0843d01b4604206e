"""Streams that went away for good: `<state_dir>/departures.json`.

A topic-named stream (`stream_from_topic`) may come from a device id that never returns
(a swapped board, an id that changes with each boot).  Idle eviction frees its memory in
the engine, but the sinks, the broker and state_dir would keep it for ever: its Home
Assistant entities, its retained topics, its baseline file.  A stream the config does not
name is forgotten once its last sample is `buffer.forget_after_s` old (30 days); one the
config names is never forgotten, and neither is one the engine still holds (not evicted,
or kept by an open alert).

Rules:
- The last sample of each such stream is noted at every sweep (the pipeline's health
  tick), from the engine's streams, before eviction takes them.  Within a run ages count
  on the monotonic clock, so a wall-clock step forgets nothing early; across runs the
  file keeps wall times, and the time the agent was away counts.
- An id known only from elsewhere at start (a baseline file in state_dir, the Home
  Assistant payload read back from the broker) with no time here counts from then: a time
  can be missing innocently (an agent older than this file, a crash before its first
  write, a wiped or absent state_dir), and forgetting at once would throw away a live
  device's learned baseline.  The ids that nothing else remembers are still reaped, one
  retention later.
- Nothing is forgotten in a run's first `buffer.idle_evict_s` (an hour where eviction is
  off): the silence that takes a running stream out of memory.  A plant that stood for
  longer than the retention (a season) powers up with the agent, and its devices must
  find their baselines when they reconnect a few minutes later.
- Forgetting removes the baseline file and the shelve here; the pipeline tells the sinks
  (the MQTT sink clears the retained topics and drops the Home Assistant entities).
- The file is written atomically (state_store.FileWriter), at most every WRITE_S while
  only times change, and at a stop; a file that cannot be read is logged and ignored, a
  write that fails is logged and the book goes on in memory.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path

from .bad_input import named
from .state_store import FileWriter, StateStore
from .timestamps import iso_utc

log = logging.getLogger("tsad.departures")

FILE = "departures.json"
WRITE_S = 300.0     # last-sample times reach the disk at least this often
NAMED_LOG = 5       # forgotten streams named one line each; more are summed up in one
GRACE_S = 3600.0    # a run's first hour forgets nothing where idle eviction is off


class Departures:
    def __init__(self, cfg) -> None:
        # the MQTT sink's read-back asks from its network thread
        self._lock = threading.Lock()
        self.path: Path | None = None
        self._file: FileWriter | None = None
        self.seen: dict[str, float] = {}     # stream -> its last sample, monotonic clock
        self._written = self.started = time.monotonic()
        self._dirty = False
        self.attach(cfg)

    @classmethod
    def carried(cls, book: Departures | None, cfg) -> Departures:
        """The book a reload hands over, attached to the new config; a new one at a start."""
        if book is None:
            return cls(cfg)
        book.attach(cfg)
        return book

    def attach(self, cfg) -> None:
        """A (re)loaded config: its retention, the streams it names, its state_dir (the
        book moves there, and the baselines found there are known from now on)."""
        after = cfg.buffer.forget_after_s
        self.grace = cfg.buffer.idle_evict_s or GRACE_S
        with self._lock:
            self.after = after or None
            self.named = set(cfg.named_streams)
            for sid in self.named & set(self.seen):
                del self.seen[sid]
        self.state_dir = cfg.state_dir
        path = Path(cfg.state_dir) / FILE if cfg.state_dir else None
        if path != self.path:
            first = self.path is None and not self.seen
            self.path = path
            self._file = FileWriter(path, "last sample times are") if path else None
            if first:
                self._load()
            self._dirty = True
            self.adopt(StateStore(cfg.state_dir).streams() if cfg.state_dir else [])
            self.save(force=True)

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            last = json.loads(self.path.read_text())["last_sample"]
            if not all(type(v) in (int, float) and math.isfinite(v) for v in last.values()):
                raise ValueError("a last sample time is not a number")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("%s: cannot be read (%s); departed streams are counted from now", self.path,
                        e)
            return
        wall, mono = time.time(), time.monotonic()
        # a time ahead of the clock (the clock stepped back since) counts from now
        self.seen = {sid: mono - max(0.0, wall - t) for sid, t in last.items()
                     if sid not in self.named}

    def save(self, force: bool = False) -> None:
        mono = time.monotonic()
        if self.path is None or not self._dirty or (not force and mono - self._written < WRITE_S):
            return
        wall = time.time()
        with self._lock:
            body = {"last_sample": {sid: wall - (mono - t) for sid, t in sorted(self.seen.items())}}
            self._written, self._dirty = mono, False
        if not self._file.write(body):
            self._dirty = True          # tried again at the next save

    # ------------------------------------------------------------ any thread
    def adopt(self, sids) -> None:
        """Ids found elsewhere (a baseline file, Home Assistant's payload): one without a
        time here counts from now."""
        now = time.monotonic()
        with self._lock:
            for sid in sids:
                if sid not in self.named and sid not in self.seen:
                    self.seen[sid] = now
                    self._dirty = True

    def gone(self, sid: str) -> bool:
        """Whether `sid` has been silent for longer than the retention."""
        with self._lock:
            t = self.seen.get(sid)
            return self.after is not None and t is not None and time.monotonic() - t > self.after

    # ------------------------------------------------------------ the pipeline thread
    def note(self, streams: dict) -> None:
        """The engine's streams: their last samples so far."""
        with self._lock:
            for sid, st in streams.items():
                if sid not in self.named and st.last_seen > 0 and \
                        self.seen.get(sid) != st.last_seen:
                    self.seen[sid] = st.last_seen
                    self._dirty = True

    def sweep(self, engine, shelves, force: bool = False) -> list[str]:
        """Forget the streams silent for longer than the retention that the engine no
        longer holds: their baseline file and shelve go here; the ids, for the sinks."""
        now = time.monotonic()
        with self._lock:
            due = [] if self.after is None or now - self.started < self.grace else sorted(
                sid for sid, t in self.seen.items()
                if now - t > self.after and sid not in engine.streams)
            ages = {sid: now - self.seen.pop(sid) for sid in due}
        if due:
            store = engine.store or (StateStore(self.state_dir) if self.state_dir else None)
            for sid in due:
                if store is not None:
                    store.forget(sid)
                engine.held_rtn.pop(sid, None)      # no longer anyone's to ack
            shelves.forget(due)
            engine.metrics.dropped["stream_forgotten"] += len(due)
            self._dirty = True
            self._log(due, ages)
        self.save(force=force or bool(due))
        return due

    def _log(self, due: list[str], ages: dict[str, float]) -> None:
        wall = time.time()
        if len(due) <= NAMED_LOG:
            for sid in due:
                log.info("stream %s: no sample since %s (buffer.forget_after_s %g s): "
                         "forgotten (its saved baseline, shelve, retained topics and Home "
                         "Assistant entities go)", sid, iso_utc(wall - ages[sid]), self.after)
        else:
            log.info("forgot %d streams without a sample for buffer.forget_after_s (%g s), "
                     "their saved baselines, shelves, retained topics and Home Assistant "
                     "entities with them: %s", len(due), self.after, named(due, NAMED_LOG))
