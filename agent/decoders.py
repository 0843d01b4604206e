"""Turn text lines (serial) and payloads (MQTT) into timestamped samples.

Input from field devices is noisy: half lines after a reconnect, line noise,
firmware printing banners, sensors reporting NaN, clocks that are wrong.  A
decoder therefore never raises.  Every input it cannot use is counted by reason
in `Metrics.malformed` and logged at most once per reason per 10 s, so a broken
sensor neither floods the journal nor goes unnoticed.

Accepted forms (C = the model's channels; T = a timestamp, number or string):
- CSV line: `v1,…,vC` or `T,v1,…,vC`, separated by `,` or (if the line has one)
  `;`, values in the model's channel order.  `timestamp: first` requires T,
  `none` forbids it, `auto` (MQTT always) decides per stream once 3 valid lines
  in a row agree, holding them until then (csv_auto.py); a line with the other
  field count is `field_count`.
- JSON with values: `{"ts": T, "values": [v1, …, vC]}` (model order) or
  `{"ts": T, "values": {"<channel>": v, …}}`.
- Flat JSON (ESPHome, Tasmota, Node-RED): `{"<channel>": v, …, "ts": T}`; one
  level of nested objects is flattened with ".", so Tasmota's
  `{"Time": T, "ANALOG": {"A0": 512}}` carries channel `ANALOG.A0`.
- A payload (MQTT) is one JSON object of either form (pretty-printed or not), a
  JSON list of such objects, or lines of one of the line forms (CSV lines, or
  JSON lines: one object per line).
The time key is `ts`, `timestamp` or `time`, looked up in this order, then in
any case (Tasmota's "Time"); without one (or null) the sample is stamped with
this machine's clock on arrival.  "values" holding a list or an object selects
the values form (unless a channel is called "values").  In the keyed forms a
key that is neither a channel nor (flat form) a time key counts
`unknown_channel`, an absent channel `missing_channel`, both soft and named in
the log; no known channel at all is `no_known_channel`.  A value is a JSON
number, a numeric string or null; any other value is missing in its channel only
(`non_numeric_value`, soft, named), while a CSV field that is no number drops its
line (`non_numeric`, named): line noise may have garbled the line's other fields.

Numbers: plain ASCII decimal only ("1_000" and non-ASCII digits, which Python's
float() accepts, are `non_numeric`).  An explicit missing value (empty field,
nan, null, none, na, n/a, inf, or a magnitude beyond float32) keeps the sample
with NaN in that channel (the ring buffer forward-fills it) and counts reason
"nan" once for the sample.

Timestamps follow agent/timestamps.py (epoch s/ms/µs/ns by magnitude or
ISO 8601, inside 2000-2100), and each stream's device clock must be plausible
(agent/device_clock.py: not behind the stream, not far ahead of this machine).

Not thread-safe: each source calls its decoder from one thread.
"""
from __future__ import annotations

import json
import logging
from time import monotonic
from itertools import chain

import numpy as np

from .bad_input import BadInput, named
from .csv_auto import Held, hold, misread, refuse_held
from .csv_block import Block, read_block
from .device_clock import Clock, Clocks
from .field_values import ABSENT, Unusable, clean, csv_values, json_values
from .metrics import Metrics
from .timestamps import BadTimestamp, epoch_seconds

log = logging.getLogger("tsad.decode")

MAX_LINE = 64 * 1024            # bytes; longer lines are framing errors, not data
MAX_PAYLOAD = 4 * 1024 * 1024   # an MQTT payload may carry many lines / objects
BLOCK_BYTES = 1024 * 1024       # the most payload bytes read as one block (csv_block.py)
TIME_KEYS = ("ts", "timestamp", "time")

# A rejected sample is always accompanied by exactly one of these.
FATAL_REASONS = frozenset({"empty", "too_long", "non_utf8", "bad_json", "field_count",
                           "non_numeric", "bad_timestamp", "no_known_channel"})
# Counted, but the sample is kept.
SOFT_REASONS = frozenset({"nan", "missing_channel", "unknown_channel", "non_numeric_value"})

Sample = tuple[float, np.ndarray]           # (ts, float32[C])
Samples = tuple[np.ndarray, np.ndarray]     # (ts float64[n], values float32[n, C])


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
        self._values_key = "values" not in self._index   # else "values" is a channel
        self._clocks = Clocks({"first": True, "none": False}.get(timestamp))
        self.report = BadInput(metrics, log_name)
        self._block_failed = False      # logged once: csv_block.py raised (a bug)
        self._mono = 0.0                # monotonic time of the decode call (device_clock.py)

    # ------------------------------------------------------------ public API
    def decode(self, line: bytes, now: float, stream: str | None = None) -> Sample | None:
        """One line -> its (ts, float32[C] in model channel order), or None if unusable or
        held (`timestamp: auto` undecided): the lines a decision releases come out of
        `decode_lines`, not here."""
        got = self.decode_lines((line,), now, stream)
        return None if got is None else (float(got[0][-1]), got[1][-1])

    def decode_lines(self, lines, now: float, stream: str | None = None) -> Samples | None:
        """Lines read together (serial) -> (ts float64[n], float32[n, C]), None if none usable."""
        ts, rows = [], []
        self._mono = monotonic()
        self._lines(lines, now, self._clocks.get(stream), ts, rows)
        self.report.flush()
        return _pack(ts, rows)

    def decode_payload(self, payload: bytes, now: float,
                       stream: str | None = None) -> Samples | None:
        """An MQTT payload (see the module docstring for its forms) -> (ts, values) or None.

        `stream` keys the per-stream clock when one subscription feeds many streams."""
        ts, rows = [], []
        self._mono = monotonic()
        self._payloads((payload,), (now,), self._clocks.get(stream), ts, rows)
        self.report.flush()
        return _pack(ts, rows)

    def decode_streams(self, groups: dict) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """Payloads of many streams (stream -> (payloads, arrivals)) -> (stream, ts, values)
        per stream with samples, each as `decode_payload` reads it: CSV streams whose lines
        are all well-formed as one block (csv_block.py), the others line by line, each
        path's streams as views of one array (500 streams x 1 message: not 500 arrays); a
        stream that raises is logged and left out."""
        clocks = [self._clocks.get(sid) for sid in groups]
        self._mono = monotonic()
        block = self._block(groups, clocks)
        ts, rows, spans, out = [], [], [], {}
        for k, (sid, (payloads, arrivals)) in enumerate(groups.items()):
            got = block.take(k) if block is not None else None
            if got is not None:
                out[sid] = got
                continue
            a = len(ts)
            try:
                self._payloads(payloads, arrivals, clocks[k], ts, rows)
            except Exception:
                del ts[a:], rows[a:]
                log.exception("%s: %d message(s) of stream %s could not be handled",
                              self.log_name, len(payloads), sid)
                continue
            if len(ts) > a:
                spans.append((sid, a, len(ts)))
        self.report.flush()
        if spans:
            t, v = _pack(ts, rows)
            out.update((sid, (t[a:b], v[a:b])) for sid, a, b in spans)
        return [(sid, *out[sid]) for sid in groups if sid in out]

    def _block(self, groups: dict, clocks: list[Clock]) -> Block | None:
        if self.protocol != "csv":
            return None
        payloads = [p for ps, _ in groups.values() for p in ps]
        try:
            # a block's temporaries take ~10x its bytes (a bytes object per field): a bulk
            # upload's 4 MiB payload is read line by line, at the memory README states
            if not payloads or sum(map(len, payloads)) > BLOCK_BYTES:
                return None
            return read_block(payloads, [a for _, arr in groups.values() for a in arr],
                              [len(ps) for ps, _ in groups.values()], clocks,
                              len(self.channels), self.timestamp, MAX_LINE, self._mono)
        except TypeError:       # a payload that is not bytes: the line reader says whose
            return None
        except Exception:       # a bug here must not cost samples: the line reader reads all
            if not self._block_failed:
                self._block_failed = True
                log.exception("%s: the CSV block reader failed; reading line by line",
                              self.log_name)
            return None

    def bad(self, reason: str, data: bytes | str = b"", n: int = 1, detail: str = "") -> None:
        """Count n unusable inputs; log unless this reason was logged < 10 s ago."""
        self.report.bad(reason, data, n, detail)

    # ------------------------------------------------------------ internals
    def _payloads(self, payloads, arrivals, clock: Clock, ts: list, rows: list) -> None:
        for payload, now in zip(payloads, arrivals):
            if len(payload) > MAX_PAYLOAD:
                self.report.note("too_long", payload[:80])
            elif not payload.strip():
                self.report.note("empty", payload)
            elif not (self.protocol == "json" and payload.lstrip()[:1] in (b"{", b"[")
                      and self._json_whole(payload, now, clock, ts, rows)):
                self._lines([ln for ln in payload.splitlines() if ln.strip()], now, clock, ts,
                            rows)

    def _lines(self, lines, now: float, clock: Clock, ts: list, rows: list) -> None:
        csv = self.protocol == "csv"
        for line in lines:
            try:
                if csv:
                    t, vals = self._csv(line, now, clock)
                else:
                    t, vals = self._json_sample(_loads(_text(line)), line, now, clock)
            except Unusable as e:
                self.report.note(e.reason, line, e.detail)
                continue
            except Held as h:
                hold(clock, h, line, self.report, ts, rows)
                continue
            ts.append(t)
            rows.append(vals)

    def _csv(self, line: bytes, now: float, clock: Clock,
             shape: bool | None = None) -> tuple[float, list[float]]:
        """A line of the stream's decided shape, or (`shape`) of that one."""
        text = _text(line)
        fields = text.split(";" if ";" in text else ",")
        n, c = len(fields), len(self.channels)
        has_ts = clock.has_ts if shape is None else shape
        if has_ts is None or n != c + has_ts:
            self._other_shape(line, now, clock, n, c)
        try:
            if "_" in text or not text.isascii():
                raise Unusable("non_numeric", "not a plain ASCII decimal number")
            t = self._device_time(fields[0], now, clock) if has_ts else now
            vals = csv_values(fields[has_ts:], self.channels)
        except Unusable as e:       # under `auto`, say how the field count was read
            raise misread(e, self.timestamp, fields, has_ts, shape is None, c) from None
        if clean(vals) and shape is None:       # a held line counts "nan" if it comes out
            self.report.note("nan", line)
        if has_ts:
            clock.keep(t, now, self._mono)
        if clock.held and shape is None:
            refuse_held(clock, self.report)
        return t, vals

    def _other_shape(self, line: bytes, now: float, clock: Clock, n: int, c: int):
        """A line the stream has not decided for: under `auto`, raises Held when it is a
        valid sample of its own shape (csv_auto.py); else Unusable."""
        decided = clock.has_ts
        want = f"{c} or {c + 1}" if decided is None else c + decided
        if self.timestamp != "auto" or not c <= n <= c + 1:
            raise Unusable("field_count", f"{n} fields, expected {want}")
        try:
            t, vals = self._csv(line, now, clock, n > c)
        except Unusable:
            if decided is None:
                raise
            # not even a sample of the other shape: noise on a decided stream
            raise Unusable("field_count", f"{n} fields, expected {want}") from None
        raise Held(n > c, t, vals)

    def _json_sample(self, obj, data, now: float, clock: Clock) -> tuple[float, list[float]]:
        if type(obj) is not dict:
            raise Unusable("bad_json", "not an object")
        values = obj.get("values")
        flat = not self._values_key or type(values) not in (list, dict)
        raw_ts = _time_of(obj, self._index if flat else ())
        t = now if raw_ts is None else self._device_time(raw_ts, now, clock)
        if flat:
            vals = self._keyed(obj, data, flat=True)
        elif type(values) is list:
            if len(values) != len(self.channels):
                raise Unusable("field_count",
                                f"{len(values)} values, expected {len(self.channels)}")
            vals = json_values(values, self.channels, self.report.note, data)
        else:
            vals = self._keyed(values, data)
        if raw_ts is not None:
            clock.keep(t, now, self._mono)
        return t, vals

    def _keyed(self, obj: dict, data, flat: bool = False) -> list[float]:
        """Values of a {"<channel>": v} object, one level of nesting flattened with ".";
        `flat`: time keys are the sample's time, not unknown channels."""
        index = self._index
        raw = [ABSENT] * len(self.channels)
        unknown = None              # the first key that names no channel, for the log
        for k, v in obj.items():
            i = index.get(k)
            if i is not None and type(v) is not dict:
                raw[i] = v
            elif type(v) is dict:       # Tasmota's {"ANALOG": {"A0": 7}}, even beside ANALOG
                for k2, v2 in v.items():
                    j = index.get(f"{k}.{k2}")
                    if j is None:
                        unknown = f"{k}.{k2}" if unknown is None else unknown
                    else:
                        raw[j] = v2
            elif not (flat and k.lower() in TIME_KEYS):
                unknown = k if unknown is None else unknown
        missing = raw.count(ABSENT)
        if missing == len(raw):
            raise Unusable("no_known_channel")
        if missing:
            vals = json_values(raw, self.channels, self.report.note, data, slow=True)
            self.report.note("missing_channel", data, named(
                [ch for ch, v in zip(self.channels, raw) if v is ABSENT]))
        else:
            vals = json_values(raw, self.channels, self.report.note, data)
        if unknown is not None:
            self.report.note("unknown_channel", data, f"key {unknown[:40]!r}")
        return vals

    def _device_time(self, raw, now: float, clock: Clock) -> float:
        """A device timestamp, refused when implausible for its stream's clock
        (device_clock.py); `Clock.keep` records it once the whole sample is accepted."""
        try:
            t = epoch_seconds(raw)
        except BadTimestamp as e:
            raise Unusable("bad_timestamp", str(e)) from None
        why, followed = clock.judge(t, now, self._mono)
        if why is not None:
            raise Unusable("bad_timestamp", why)
        if followed is not None:
            more = self.report.may_log("clock_step")
            if more is not None:    # two devices on one stream would otherwise flood the log
                log.warning("%s: %s%s", self.log_name, followed,
                            f" (+{more} more steps)" if more else "")
        return t

    def _json_whole(self, payload: bytes, now: float, clock: Clock, ts: list,
                    rows: list) -> bool:
        """The payload as one JSON document (an object, possibly pretty-printed, or a list
        of objects); False when it is not one, so the caller reads it as JSON lines."""
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
                return False
            self.report.note(reason, payload)
            return True
        items = doc if type(doc) is list else [doc]
        del doc
        sample = self._json_sample
        for k, item in enumerate(items):
            items[k] = None         # each parsed object is freed once read: lower peak memory
            try:
                t, vals = sample(item, payload, now, clock)
            except Unusable as e:
                self.report.note(e.reason, payload, e.detail)
                continue
            ts.append(t)
            rows.append(vals)
        return True


def _text(line: bytes) -> str:
    if len(line) > MAX_LINE:
        raise Unusable("too_long")
    try:
        text = line.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise Unusable("non_utf8") from None
    if not text:
        raise Unusable("empty")
    return text


def _loads(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise Unusable("bad_json") from None


def _time_of(obj: dict, channels):
    """The value under the first of TIME_KEYS, then of them in any case, that is not a
    channel; None without one."""
    for k in TIME_KEYS:
        v = obj.get(k)
        if v is not None and k not in channels:
            return v
    for k, v in obj.items():
        if k.lower() in TIME_KEYS and k not in channels:
            return v
    return None


def _pack(ts: list[float], rows: list[list[float]]) -> Samples | None:
    if not rows:
        return None
    # rows hold only finite float32-range values or NaN (_clean), so the cast raises no
    # overflow warning; read flat, the same casts cost a third less than nested lists
    values = np.fromiter(chain.from_iterable(rows), np.float32, len(rows) * len(rows[0]))
    return np.array(ts, np.float64), values.reshape(len(rows), -1)
