"""Turn text lines (serial) and payloads (MQTT) into timestamped samples.

Input from field devices is noisy: half lines after a reconnect, line noise,
firmware printing banners, sensors reporting NaN.  A decoder therefore never
raises.  Every line it cannot use is counted by reason in `Metrics.malformed`
and logged at most once per reason per 10 s, so a broken sensor neither floods
the journal nor goes unnoticed.

Value policy: an explicit missing value (empty CSV field, NaN, null, inf) in
an otherwise valid sample keeps the sample with NaN in that channel (the ring
buffer forward-fills it) and counts reason "nan" once for the line.  A line
that cannot be read as a whole sample yields None.

Timestamps: epoch seconds (numbers above 1e11 are read as epoch milliseconds,
which many devices send; 1e11 s would be the year 5138) or ISO-8601 /
"YYYY-MM-DD hh:mm:ss"; a time without a zone is taken as UTC.
"""
from __future__ import annotations

import json
import logging
import math
import time
from datetime import datetime, timezone

import numpy as np

from .metrics import Metrics

log = logging.getLogger("tsad.decode")

MAX_LINE = 64 * 1024            # bytes; longer lines are framing errors, not data
MAX_PAYLOAD = 4 * 1024 * 1024   # an MQTT payload may carry many lines / objects
LOG_INTERVAL_S = 10.0
_MS_EPOCH_ABOVE = 1e11

# A None result is always accompanied by exactly one of these.
FATAL_REASONS = frozenset({"empty", "too_long", "non_utf8", "bad_json", "field_count",
                           "non_numeric", "bad_timestamp", "no_known_channel"})
# Counted, but the sample is kept.
SOFT_REASONS = frozenset({"nan", "missing_channel", "unknown_channel"})

_MISSING_TOKENS = frozenset({"", "nan", "null", "none", "na", "n/a"})

Sample = tuple[float, np.ndarray]


class _Unusable(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _epoch(v: float) -> float:
    if not math.isfinite(v):
        raise _Unusable("bad_timestamp")
    return v / 1000.0 if abs(v) > _MS_EPOCH_ABOVE else v


def parse_timestamp(v) -> float:
    """Epoch seconds from a number or a string (epoch or ISO-8601); raises ValueError."""
    try:
        return _parse_ts(v)
    except _Unusable:
        raise ValueError(f"not a timestamp: {v!r}") from None


def _parse_ts(v) -> float:
    if isinstance(v, bool):
        raise _Unusable("bad_timestamp")
    if isinstance(v, (int, float)):
        try:
            return _epoch(float(v))
        except OverflowError:
            raise _Unusable("bad_timestamp") from None
    if not isinstance(v, str):
        raise _Unusable("bad_timestamp")
    s = v.strip()
    try:
        return _epoch(float(s))
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(s[:-1] + "+00:00" if s.endswith(("Z", "z")) else s)
    except (ValueError, OverflowError):
        raise _Unusable("bad_timestamp") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _num(v) -> float:
    """One JSON value as float; None is a missing value (NaN)."""
    if v is None:
        return math.nan
    if isinstance(v, bool):
        raise _Unusable("non_numeric")
    if isinstance(v, (int, float)):
        try:
            return float(v)
        except OverflowError:
            return math.inf
    if isinstance(v, str):
        s = v.strip()
        if s.lower() in _MISSING_TOKENS:
            return math.nan
        try:
            return float(s)
        except ValueError:
            pass
    raise _Unusable("non_numeric")


class LineDecoder:
    def __init__(self, channels: list[str], protocol: str, timestamp: str,
                 metrics: Metrics, log_name: str):
        if protocol not in ("csv", "json"):
            raise ValueError(f"unknown protocol {protocol!r} (expected 'csv' or 'json')")
        if timestamp not in ("auto", "first", "none"):
            raise ValueError(f"unknown timestamp mode {timestamp!r} (expected auto/first/none)")
        self.channels = list(channels)
        self.protocol = protocol
        self.timestamp = timestamp
        self.metrics = metrics
        self.log_name = log_name
        self._index = {name: i for i, name in enumerate(self.channels)}
        self._last_log: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    # ------------------------------------------------------------ public API
    def decode(self, line: bytes, now: float) -> Sample | None:
        """One line -> (ts, float32[C] in model channel order), or None if unusable."""
        try:
            text = self._text(line)
            if self.protocol == "csv":
                return self._csv(text, line, now)
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError):
                raise _Unusable("bad_json") from None
            return self._json_obj(obj, line, now)
        except _Unusable as e:
            self.bad(e.reason, line)
            return None

    def decode_payload(self, payload: bytes, now: float) -> list[Sample]:
        """An MQTT payload: one or more lines, or (json) one object or a list of objects."""
        if len(payload) > MAX_PAYLOAD:
            self.bad("too_long", payload)
            return []
        if not payload.strip():
            self.bad("empty", payload)
            return []
        if self.protocol == "json" and payload.lstrip()[:1] in (b"{", b"["):
            whole = self._json_whole(payload, now)
            if whole is not None:
                return whole
        out = []
        for line in payload.splitlines():
            if line.strip():
                s = self.decode(line, now)
                if s is not None:
                    out.append(s)
        return out

    def bad(self, reason: str, data: bytes | str = b"") -> None:
        """Count one unusable input; log it unless this reason was logged < 10 s ago."""
        self.metrics.bad(reason)
        now = time.monotonic()
        last = self._last_log.get(reason)
        if last is not None and now - last < LOG_INTERVAL_S:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        self._last_log[reason] = now
        more = self._suppressed.pop(reason, 0)
        snippet = data[:80] if isinstance(data, (bytes, str)) else b""
        log.warning("%s: %s in %r%s", self.log_name, reason, snippet,
                    f" (+{more} more since last report)" if more else "")

    # ------------------------------------------------------------ internals
    def _text(self, line: bytes) -> str:
        if len(line) > MAX_LINE:
            raise _Unusable("too_long")
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise _Unusable("non_utf8") from None
        if not text:
            raise _Unusable("empty")
        return text

    def _csv(self, text: str, line: bytes, now: float) -> Sample:
        fields = text.split(";" if ";" in text else ",")
        c = len(self.channels)
        n = len(fields)
        if self.timestamp == "first" or (self.timestamp == "auto" and n == c + 1):
            if n != c + 1:
                raise _Unusable("field_count")
            ts = _parse_ts(fields[0])
            fields = fields[1:]
        elif n == c:
            ts = now
        else:
            raise _Unusable("field_count")
        try:
            vals = [float(f) for f in fields]
        except ValueError:
            vals = []
            for f in fields:
                try:
                    vals.append(float(f))
                except ValueError:
                    if f.strip().lower() not in _MISSING_TOKENS:
                        raise _Unusable("non_numeric") from None
                    vals.append(math.nan)
        return ts, self._finish(vals, line)

    def _json_obj(self, obj, line: bytes, now: float) -> Sample:
        if not isinstance(obj, dict) or "values" not in obj:
            raise _Unusable("bad_json")
        raw_ts = obj.get("ts")
        ts = now if raw_ts is None else _parse_ts(raw_ts)
        values = obj["values"]
        if isinstance(values, list):
            if len(values) != len(self.channels):
                raise _Unusable("field_count")
            return ts, self._finish([_num(v) for v in values], line)
        if isinstance(values, dict):
            vals = [math.nan] * len(self.channels)
            present = np.zeros(len(self.channels), dtype=bool)
            unknown = 0
            for k, v in values.items():
                i = self._index.get(k)
                if i is None:
                    unknown += 1
                else:
                    vals[i] = _num(v)
                    present[i] = True
            known = int(present.sum())
            if unknown:
                self.bad("unknown_channel", line)
            if not known:
                raise _Unusable("no_known_channel")
            if known < len(self.channels):
                self.bad("missing_channel", line)
            return ts, self._finish(vals, line, present)
        raise _Unusable("bad_json")

    def _json_whole(self, payload: bytes, now: float) -> list[Sample] | None:
        """The payload as one JSON document (an object, possibly pretty-printed, or a list
        of objects); None when it is not one, so the caller reads it as JSON lines."""
        try:
            doc = json.loads(payload.decode("utf-8"))
        except UnicodeDecodeError:
            reason = "non_utf8"
        except (ValueError, RecursionError):
            reason = "bad_json"
        else:
            reason = None
        if reason is not None:
            if payload.lstrip()[:1] == b"{":
                return None
            self.bad(reason, payload)
            return []
        out = []
        for item in doc if isinstance(doc, list) else [doc]:
            try:
                out.append(self._json_obj(item, payload, now))
            except _Unusable as e:
                self.bad(e.reason, payload)
        return out

    def _finish(self, vals: list[float], line: bytes,
                present: np.ndarray | None = None) -> np.ndarray:
        with np.errstate(over="ignore"):
            arr = np.asarray(vals, dtype=np.float32)
        bad = ~np.isfinite(arr)   # also catches values that overflow float32
        if bad.any():
            arr[bad] = np.nan
            # absent dict keys are already counted as missing_channel
            if present is None or (bad & present).any():
                self.bad("nan", line)
        return arr
