"""JSON-lines file sink: every alert event appended as one JSON object per line."""
from __future__ import annotations

import logging
from pathlib import Path

from ..config_base import Strict
from .base import Sink, to_json

log = logging.getLogger(__name__)


class JsonlSinkConfig(Strict):
    path: str


class JsonLinesSink(Sink):
    key = "jsonl"
    config_class = JsonlSinkConfig

    @classmethod
    def from_config(cls, cfg, metrics) -> "JsonLinesSink | None":
        c = cfg.sinks.jsonl
        return None if c is None else cls(c.path, metrics=metrics)

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
