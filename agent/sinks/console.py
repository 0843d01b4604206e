"""Console sink: one line per alert event on stdout (text for people, JSON for tools).

"text" prints alert events only; "json" also prints state changes, one object
per line.  Scores are never printed: they arrive per window.
"""
from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import Literal, TextIO

from ..config_base import Strict
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


def format_alert(a: dict, now: float | None = None) -> str:
    """One line per event, stamped with the SAMPLE time it refers to (start for new,
    end for end) so that replayed and live output read the same."""
    kind = a.get("type", "?")
    when = {"new": a.get("start"), "end": a.get("end")}.get(kind)
    if isinstance(when, (int, float)):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    elif when:
        stamp = str(when)
    else:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S",
                              time.localtime(now if now is not None else time.time()))
    head = f"{stamp} ALERT {kind:<6} {a.get('stream', '?')}"
    if kind == "end":
        start, end = _epoch(a.get("start")), _epoch(a.get("end"))
        dur = f" dur={end - start:.1f}s" if start is not None and end is not None else ""
        body = f"peak={_num(a.get('peak_score'))} thr={_num(a.get('threshold'))}{dur}"
    else:
        top = ",".join(f"{c.get('name')}({_num(c.get('share'), '.2f')})"
                       for c in a.get("top_channels") or [])
        body = f"score={_num(a.get('score'))} thr={_num(a.get('threshold'))} top={top or '-'}"
    return f"{head} {body} id={a.get('id', '?')}"


class ConsoleSinkConfig(Strict):
    enabled: bool = True
    format: Literal["text", "json"] = "text"


class ConsoleSink(Sink):
    key = "console"
    config_class = ConsoleSinkConfig
    default_config = ConsoleSinkConfig()

    @classmethod
    def from_config(cls, cfg, metrics) -> "ConsoleSink | None":
        c = cfg.sinks.console
        return cls(c.format) if c.enabled else None

    def __init__(self, fmt: str = "text", stream: TextIO | None = None) -> None:
        if fmt not in ("text", "json"):
            raise ValueError(f"console format must be 'text' or 'json', not {fmt!r}")
        self.fmt = fmt
        self._out = stream

    def _print(self, line: str) -> None:
        # resolved per call so that a redirected sys.stdout (tests, daemons) is honoured
        print(line, file=self._out or sys.stdout, flush=True)

    def alert(self, alert: dict) -> None:
        self._print(to_json(alert) if self.fmt == "json" else format_alert(alert))

    def state(self, stream: str, state: str) -> None:
        if self.fmt == "json":
            self._print(to_json({"type": "state", "stream": stream, "state": state,
                                 "ts": round(time.time(), 3)}))
