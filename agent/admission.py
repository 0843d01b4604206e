"""Which source may create a stream, and feed one: the engine's door.

Rules:
- A source creates at most its cap of streams (`caps`, source id -> count; else
  `default_cap`): one for a serial line, `max_streams` for a topic-named MQTT
  subscription.  The rest are refused, counted in `dropped.stream_limit` and logged
  once per source.
- A stream id belongs to one source: the stream the config names belongs to its own
  source; any other id to the first source that uses it.  Samples another source sends
  under that id (a topic level that happens to equal another stream's id) are refused,
  counted in `dropped.stream_collision` and logged once per id and source: two devices'
  samples in one stream would be one garbled series, and its alerts would blame neither.
"""
from __future__ import annotations

import logging

from .metrics import Metrics
from .sources.base import Batch

log = logging.getLogger("tsad.engine")


class Admission:
    def __init__(self, metrics: Metrics, caps: dict[str, int] | None = None,
                 default_cap: int = 1, named=()) -> None:
        self.metrics = metrics
        self.caps = dict(caps or {})
        self.default_cap = default_cap
        self.named = set(named)     # streams the config names: commands reach them sample or not
        self.counts: dict[str, int] = {}
        self._told: set = set()     # sources, and (stream, source) pairs, already logged

    def room(self, sid: str, src: str) -> bool:
        """may_create's answer, without counting or logging a refusal."""
        return not (src != sid and sid in self.named) and \
            self.counts.get(src, 0) < self.caps.get(src, self.default_cap)

    def may_create(self, sid: str, src: str) -> bool:
        if src != sid and sid in self.named:
            return self.collision(sid, src, sid)
        cap = self.caps.get(src, self.default_cap)
        if self.counts.get(src, 0) < cap:
            return True
        self.metrics.dropped["stream_limit"] += 1
        if src not in self._told:
            self._told.add(src)
            log.warning("source %s: new stream %r refused: it already has %d stream(s), "
                        "its max_streams (counted in dropped.stream_limit)", src, sid, cap)
        return False

    def created(self, src: str) -> None:
        self.counts[src] = self.counts.get(src, 0) + 1

    def removed(self, src: str) -> None:
        self.counts[src] -= 1

    def collision(self, sid: str, src: str, owner: str) -> bool:
        """Count and log samples of stream `sid` from `src`, which `owner` feeds; False."""
        self.metrics.dropped["stream_collision"] += 1
        if (sid, src) not in self._told:
            self._told.add((sid, src))
            log.warning("source %s: samples for stream %r refused: source %s feeds a stream "
                        "of that id (counted in dropped.stream_collision)", src, sid, owner)
        return False

    def owned(self, sid: str, parts: list[Batch], owner: str | None) -> list[Batch]:
        """The parts of one step for stream `sid` that its owner sent (`owner`: the
        stream's source, None before it exists: then the config's or the first part's)."""
        if owner is None:
            owner = sid if sid in self.named else (parts[0].source or sid)
        return [p for p in parts if (p.source or sid) == owner
                or self.collision(sid, p.source or sid, owner)]
