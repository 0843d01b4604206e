"""Request bodies of the POST endpoints, checked and handed to the service.

POST /anomaly, by the shape of `values` (C channels, W the model's window):
- C numbers: ONE sample, appended to `stream` (default: the service's default stream)
  at `ts` (default: arrival time) -> the score and alert state, or how many samples
  the stream still needs ({"status": "learning" | "warming_up" | "skipped", "needed"}).
  This is the seed AutoEncoder REST API's call: `{"values": [v1, ..., vC]}`.
- W lists of C numbers: ONE window, scored as is (no state changes), against the
  learned baseline of `stream` when one is named, else the model's own (see
  `service` for when that is refused).  `ts` has no meaning for a window: refused.
- anything else: 422 naming both shapes.
Numbers must be finite and fit float32 (an integer like 10**400 is refused, not
overflowed); stream ids are 1-64 of A-Z a-z 0-9 _ . -.  Sample times (`sample_time`):
epoch seconds, milliseconds, microseconds or nanoseconds told apart by magnitude, or
ISO 8601 (UTC when no zone is given), between 2000 and 2100; anything else is refused.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
import uuid

import numpy as np

from ..config_base import STREAM_ID_CHARS
from ..timestamps import BadTimestamp, epoch_seconds
from .service import DEFAULT_STREAM, AnomalyService, InputError

STREAM_ID = re.compile(rf"^{STREAM_ID_CHARS}{{1,64}}\Z")
FLOAT32_MAX = 3.4e38


class HttpError(Exception):
    def __init__(self, status: int, msg: str, reason: str | None = None,
                 headers: dict | None = None):
        super().__init__(msg)
        self.status, self.msg, self.reason, self.headers = status, msg, reason, headers


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _json_kind(x) -> str:
    """What a JSON value is, in JSON's words (a client sent JSON, not Python)."""
    if x is None or isinstance(x, bool):
        return json.dumps(x)
    return {dict: "an object", list: "an array", str: "a string"}.get(type(x), "a number")


def _json_text(x) -> str:
    """A JSON value for a message, in JSON's words: the string or number (40 characters
    at most), else its kind."""
    if isinstance(x, str):
        return json.dumps(x[:40]) + ("..." if len(x) > 40 else "")
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return json.dumps(x)[:40] if math.isfinite(x) else "a number beyond float64"
    return _json_kind(x)


def _int(text: str) -> int | float:
    # Python refuses to read integers over 4,300 digits with advice for the server's
    # code; far beyond float64 anyway, such a number is read as one
    return int(text) if len(text) <= 400 else float("-inf" if text[0] == "-" else "inf")


def json_body(body: bytes) -> dict:
    try:
        doc = json.loads(body, parse_constant=_reject_constant, parse_int=_int)
    except (ValueError, RecursionError) as e:   # UnicodeDecodeError is a ValueError
        raise HttpError(400, f"body is not JSON: {' '.join(str(e).split())[:200]}",
                        "http_json") from None
    if not isinstance(doc, dict):
        raise HttpError(422, f"body must be a JSON object, got {_json_kind(doc)}", "http_shape")
    return doc


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _values(v, w: int, c: int) -> np.ndarray:
    """`values` as float32: [C] (a sample) or [W, C] (a window)."""
    shapes = (f"values must be one sample: a list of {c} numbers, or one window: a list of "
              f"{w} lists of {c} numbers (oldest first)")
    if isinstance(v, list) and v and all(_is_number(x) for x in v):
        if len(v) != c:
            raise HttpError(422, f"{shapes}; got a list of {len(v)} numbers", "http_shape")
    elif isinstance(v, list) and v and all(isinstance(r, list) for r in v):
        if not all(_is_number(x) for r in v for x in r):
            raise HttpError(422, f"{shapes}; got lists holding something other than numbers",
                            "http_shape")
        got = sorted({len(r) for r in v})
        if len(v) != w or got != [c]:
            raise HttpError(422, f"{shapes}; got {len(v)} list(s) of "
                                 f"{', '.join(map(str, got))} number(s)", "http_shape")
    else:
        what = "an empty list" if v == [] else \
            "a list holding something other than numbers" if isinstance(v, list) else \
            _json_kind(v)
        raise HttpError(422, f"{shapes}; got {what}", "http_shape")
    try:
        a = np.asarray(v, np.float64)
    except OverflowError:      # an integer beyond float64
        a = np.full(1, np.inf)
    if not np.isfinite(a).all() or np.abs(a).max(initial=0) > FLOAT32_MAX:
        raise HttpError(422, "values must be finite numbers within float32 range (±3.4e38)",
                        "http_range")
    return a.astype(np.float32)


def sample_time(value) -> float:
    """Epoch seconds from an API caller's `ts` (agent/timestamps.py, the decoders' rule);
    InputError if unusable."""
    try:
        return epoch_seconds(value)
    except BadTimestamp:
        raise InputError("ts must be epoch seconds, ms, µs or ns, or ISO 8601, between 2000 "
                         f"and 2100; got {_json_text(value)}") from None


def handle_anomaly(svc: AnomalyService, doc: dict) -> dict:
    if "values" not in doc:
        raise HttpError(422, "field 'values' is required: one sample (a list of "
                             f"{svc.meta.n_channels} numbers) or one window", "http_shape")
    values = _values(doc["values"], svc.meta.window, svc.meta.n_channels)
    sid = doc.get("stream")
    if "stream" in doc and not (isinstance(sid, str) and STREAM_ID.match(sid)):
        raise HttpError(422, "stream must be 1-64 characters of A-Z a-z 0-9 _ . -", "http_shape")
    if values.ndim == 2:
        if "ts" in doc:
            raise HttpError(422, "ts belongs to one sample; a window is scored as sent "
                                 "(send samples one at a time to place them in time)",
                            "http_shape")
        return svc.score_window(values, sid)
    ts = sample_time(doc["ts"]) if "ts" in doc else time.time()
    return svc.push_sample(sid or DEFAULT_STREAM, ts, values)


def handle_paddlex(svc: AnomalyService, doc: dict) -> dict:
    csv_b64 = doc.get("csv")
    if not isinstance(csv_b64, str) or not csv_b64:
        raise HttpError(422, "field 'csv' (base64 of a CSV file) is required", "http_shape")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://", csv_b64):
        raise HttpError(422, "'csv' is a URL: this server does not fetch URLs (no network); "
                             "send the file as base64", "http_url")
    try:
        # line breaks and spaces are how MIME base64 (the `base64` tool's default) wraps
        # it: dropped; anything else outside the alphabet is still an error
        data = base64.b64decode(csv_b64.encode("ascii").translate(None, b" \t\r\n\v\f"),
                                validate=True)
    except (binascii.Error, ValueError):        # UnicodeEncodeError is a ValueError
        raise HttpError(400, "field 'csv' is not valid base64", "http_base64") from None
    text, image = svc.predict_csv(data)
    return {"logId": str(uuid.uuid4()), "errorCode": 0, "errorMsg": "Success",
            "result": {"csv": base64.b64encode(text.encode()).decode("ascii"), "image": image}}
