"""The sink plug-in interface: where alerts, states, scores and health go.

Each plug-in is one module of this package: a `Sink` subclass that declares its
section under the config's `sinks:` (`key`, `config_class`, `default_config`; key
None when it has a top-level section of its own, as the MQTT sink has `mqtt:`) and
builds itself with `from_config`.  The registry (`agent.sinks.SINKS`) and the
`sinks:` config section are built from the subclasses.

Also home of `to_json`, the one encoder all sinks use so that numpy values and
non-finite floats (never valid JSON) are handled the same way everywhere.
"""
from __future__ import annotations

import json
import math
from typing import ClassVar


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


class Sink:
    key: ClassVar[str | None] = None
    config_class: ClassVar[type | None] = None
    default_config: ClassVar[object] = None

    @classmethod
    def from_config(cls, cfg, metrics) -> "Sink | None":
        """The sink an AgentConfig asks for, or None when it is not enabled."""
        raise NotImplementedError

    def start(self) -> None:
        """Connect / open; must not block the pipeline on an absent broker."""

    def carry(self, open_ids: set[str], ended: list[dict]) -> None:
        """Before start(), across a reload that rebuilt this sink: the alerts the engine
        holds open (the previous sink's record of them is not one a killed run left), and
        the end events of those that ended unacknowledged (still shown until acked)."""

    def attach(self, cfg, command, departures=None) -> None:
        """A pipeline feeds this sink from now on (at its start, and after every reload,
        which may keep the sink): its config, `command(payload, reply)`, which takes
        an operator command as received and calls `reply(result)` once, and its book of
        departed streams (agent/departures.py: `gone(sid)`, `adopt(sids)`)."""

    def alert(self, alert: dict) -> None:
        """An alert lifecycle event (schema in README: new/update/end)."""

    def state(self, stream: str, state: str) -> None:
        """Stream state entered: 'learning', 'warming_up' (no window judged since it was
        built), 'normal', 'anomaly' or 'no_data' (a channel without a value: no window can
        be scored; agent/stream_status.py)."""

    def shows(self, stream: str) -> bool:
        """Whether operators see `stream` through this sink (Home Assistant buttons) while
        the engine does not run it: its commands are then taken (commands.idle)."""
        return False

    def stream_status(self, stream: str, status: dict) -> None:
        """A stream's status changed: {"state", "online", "stale_after_s", "shelved_until"}
        (agent.health.stream_presence), at most once a second."""

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

    def evicted(self, streams: list[str]) -> None:
        """Streams dropped from memory for want of samples; each may come back."""

    def forget(self, streams: list[str]) -> None:
        """Streams gone for good (buffer.forget_after_s): nothing of them is to be kept."""

    def stop(self) -> None:
        """Flush and close; for MQTT publish availability 'offline'."""
