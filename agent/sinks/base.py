"""The sink plug-in interface: where alerts, states, scores and health go."""
from __future__ import annotations


class Sink:
    def start(self) -> None:
        """Connect / open; must not block the pipeline on an absent broker."""

    def alert(self, alert: dict) -> None:
        """An alert lifecycle event (schema in README: new/update/end)."""

    def state(self, stream: str, state: str) -> None:
        """Stream state changed: 'normal' or 'anomaly'."""

    def score(self, stream: str, ts: float, score: float, threshold: float, label: int) -> None:
        """Latest score of a stream (sinks rate-limit as they need)."""

    def scores(self, stream: str, ts, scores, threshold: float, labels, alert_open) -> None:
        """A block of per-window results (numpy arrays of equal length).

        The pipeline calls this once per block so that per-window Python work stays
        out of the hot path; sinks that only want the latest value use the last row.
        """
        if len(ts):
            self.score(stream, float(ts[-1]), float(scores[-1]), threshold, int(labels[-1]))

    def health(self, health: dict) -> None:
        """Periodic health snapshot."""

    def stop(self) -> None:
        """Flush and close; for MQTT publish availability 'offline'."""
