"""Console sink: one line per alert event on stdout (text for people, JSON for tools).

"text" prints alert events only; "json" also prints state changes, one object
per line.  Scores are never printed: they arrive per window.

Time: every line is stamped with SAMPLE time, ISO 8601 UTC with milliseconds, so that
replayed and live output read the same: a "new" with its start, an "end" with its
end, an "update" (which carries neither) and a JSON state line with the stream's
newest sample time known when it was printed (null before its first scored window).

Fewer lines: an open alert sends an "update" every alerts.update_interval_s; those
are printed only with `updates: true`, except the first one that shows the alert
acknowledged (an operator's ack is news).
"""
from __future__ import annotations

import sys
from datetime import datetime
from typing import Literal, TextIO

from ..config_base import Strict
from ..timestamps import iso_utc
from .base import Sink, to_json


def _num(v, spec: str = ".4g") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "?"


def _epoch(v) -> float | None:
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def format_alert(a: dict, latest: float | None = None) -> str:
    """One line per event, stamped with the sample time it refers to: start for new, end
    for end, `latest` (the stream's newest sample time) for an update."""
    kind = a.get("type", "?")
    when = {"new": a.get("start"), "end": a.get("end")}.get(kind, latest)
    t = _epoch(when) if when is not None else None
    stamp = (iso_utc(t) if t is not None else None) or "?"
    head = f"{stamp} ALERT {kind:<6} {a.get('stream', '?')}"
    if kind == "end":
        start, end = _epoch(a.get("start")), _epoch(a.get("end"))
        dur = f" dur={end - start:.1f}s" if start is not None and end is not None else ""
        body = f"peak={_num(a.get('peak_score'))} thr={_num(a.get('threshold'))}{dur}"
    else:
        top = ",".join(f"{c.get('name')}({_num(c.get('share'), '.2f')})"
                       for c in a.get("top_channels") or [])
        body = f"score={_num(a.get('score'))} thr={_num(a.get('threshold'))} top={top or '-'}"
    ack = " acknowledged" if a.get("acknowledged") else ""
    return f"{head} {body}{ack} id={a.get('id', '?')}"


class ConsoleSinkConfig(Strict):
    enabled: bool = True
    format: Literal["text", "json"] = "text"
    updates: bool = False


class ConsoleSink(Sink):
    key = "console"
    config_class = ConsoleSinkConfig
    default_config = ConsoleSinkConfig()

    @classmethod
    def from_config(cls, cfg, metrics) -> "ConsoleSink | None":
        c = cfg.sinks.console
        return cls(c.format, updates=c.updates) if c.enabled else None

    def __init__(self, fmt: str = "text", stream: TextIO | None = None,
                 updates: bool = False) -> None:
        if fmt not in ("text", "json"):
            raise ValueError(f"console format must be 'text' or 'json', not {fmt!r}")
        self.fmt, self.updates = fmt, updates
        self._out = stream
        self._latest: dict[str, float] = {}   # stream -> newest sample time seen
        self._acked: set[str] = set()         # open alerts whose acknowledgement was printed

    def _print(self, line: str) -> None:
        # resolved per call so that a redirected sys.stdout (tests, daemons) is honoured
        print(line, file=self._out or sys.stdout, flush=True)

    def scores(self, stream: str, ts, scores, threshold: float, labels, alert_open) -> None:
        if len(ts):
            self._latest[stream] = float(ts[-1])

    def _wanted(self, a: dict) -> bool:
        kind, aid = a.get("type"), a.get("id")
        if kind == "end":
            self._acked.discard(aid)
        if kind != "update" or self.updates:
            return True
        if a.get("acknowledged") and aid not in self._acked:
            self._acked.add(aid)
            return True
        return False

    def alert(self, alert: dict) -> None:
        if self._wanted(alert):
            self._print(to_json(alert) if self.fmt == "json"
                        else format_alert(alert, self._latest.get(alert.get("stream"))))

    def state(self, stream: str, state: str) -> None:
        if self.fmt == "json":
            latest = self._latest.get(stream)
            self._print(to_json({"type": "state", "stream": stream, "state": state,
                                 "ts": iso_utc(latest) if latest is not None else None}))
