"""Prometheus sink: what the daemon's endpoint needs from the results and that the engine
does not keep, the latest score of each stream and alert events by stream and type.

Configured by the top-level `metrics:` section (nothing under `sinks:`), built only when
the endpoint is on (`metrics.listen`).  Like every sink it runs on the pipeline thread;
it only stores plain values in the process-wide `Metrics`, which the pipeline thread
copies into the snapshot a scrape reads (agent/prom.py): a scrape never reads them
while they change, and a reload that rebuilds the sinks keeps them.
"""
from __future__ import annotations

from .base import Sink


class PrometheusSink(Sink):
    @classmethod
    def from_config(cls, cfg, metrics) -> "PrometheusSink | None":
        return cls(metrics) if cfg.metrics.listen else None

    def __init__(self, metrics) -> None:
        self.metrics = metrics

    def scores(self, stream: str, ts, scores, threshold: float, labels, alert_open) -> None:
        if len(ts):
            self.metrics.stream_scores[stream] = float(scores[-1])

    def alert(self, alert: dict) -> None:
        self.metrics.stream_alerts[(str(alert.get("stream")), str(alert.get("type")))] += 1
