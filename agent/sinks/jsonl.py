"""JSON-lines file sink: every alert event appended as one JSON object per line.

Also home of `to_json`, the one encoder all sinks use so that numpy values and
non-finite floats (never valid JSON) are handled the same way everywhere.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from .base import Sink

log = logging.getLogger(__name__)


def _plain(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "tolist"):          # numpy scalars and arrays
        return _plain(obj.tolist())
    return obj


def to_json(obj) -> str:
    """Compact JSON; NaN/inf become null, numpy values become Python values."""
    return json.dumps(_plain(obj), separators=(",", ":"), allow_nan=False, default=str)


class JsonLinesSink(Sink):
    def __init__(self, path: str | Path, metrics=None) -> None:
        self.path = Path(path)
        self.metrics = metrics
        self._f = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def alert(self, alert: dict) -> None:
        if self._f is None:
            self.start()
        try:
            self._f.write(to_json(alert) + "\n")
            self._f.flush()     # a reader tailing the file sees each event at once
        except OSError as e:
            log.error("cannot append to %s: %s", self.path, e)
            if self.metrics is not None:
                self.metrics.dropped["jsonl_write"] += 1

    def stop(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError as e:      # the failed line was counted already
                log.error("closing %s: %s", self.path, e)
            self._f = None
