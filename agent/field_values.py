"""How one field of a sample becomes a float, by the rules of agent/decoders.py.

A JSON value is a number, a numeric string or null; a CSV field is what float() reads
from plain ASCII.  An explicit missing value (MISSING_TOKENS, null) is NaN, and so is
any value float32 cannot hold (`clean`): the ring buffer forward-fills NaN, and the
decoder counts reason "nan" once for the sample.  Anything else raises `Unusable` with
the reason the decoder counts.
"""
from __future__ import annotations

import json
import math
from typing import Callable

import numpy as np

from .bad_input import named

MISSING_TOKENS = frozenset({"", "nan", "null", "none", "na", "n/a"})
FLT_MAX = float(np.finfo(np.float32).max)
NAN = math.nan
ABSENT = object()       # a channel a keyed JSON sample does not name


class Unusable(Exception):
    """A sample the decoder refuses: `reason` is what it counts."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail


def json_number(v) -> float:
    """One JSON value as float; None and missing tokens are NaN."""
    t = type(v)
    if t is float:
        return v
    if t is int:
        try:
            return float(v)
        except OverflowError:
            return math.inf
    if v is None:
        return NAN
    if t is str:
        s = v.strip()
        if s.lower() in MISSING_TOKENS:
            return NAN
        if s.isascii() and "_" not in s:
            try:
                return float(s)
            except ValueError:
                pass
    raise Unusable("non_numeric")


def clean(vals: list[float]) -> bool:
    """Replace values float32 cannot hold (NaN, inf, huge) by NaN in place; True if any."""
    if sum(map(abs, vals)) <= FLT_MAX:     # false for NaN and inf as well
        return False
    bad = False
    for i, v in enumerate(vals):
        if not -FLT_MAX <= v <= FLT_MAX:
            vals[i] = NAN
            bad = True
    return bad


def csv_values(fields: list[str], channels: list[str]) -> list[float]:
    """CSV fields (the values of `channels`, in order) as floats, missing tokens as NaN;
    a field that is neither is `non_numeric`, named by its channel: in a line of hundreds
    of fields, the log must say which one."""
    try:
        return [float(f) for f in fields]
    except ValueError:
        return [missing_or_float(f, ch) for f, ch in zip(fields, channels)]


def missing_or_float(f: str, channel: str) -> float:
    """A CSV field float() refused: NaN when it is a missing token."""
    try:
        return float(f)
    except ValueError:
        if f.strip().lower() in MISSING_TOKENS:
            return NAN
        raise Unusable("non_numeric", f"{channel[:40]}={f.strip()[:24]!r}") from None


def json_values(raw: list, channels: list[str], note: Callable, data,
                slow: bool = False) -> list[float]:
    """A JSON sample's values (in channel order; ABSENT: not in the sample, `slow` says
    there may be some) as floats, NaN where missing.  `note(reason, data, detail)` counts
    `nan` for an explicit missing value or one float32 cannot hold.  A value that is no
    number (a gateway's "Bad" or "unavailable", true, a list) is missing in its channel
    only, counted `non_numeric_value` and named: one tag of a 300-channel sample must not
    drop the other 299."""
    if not slow:
        try:
            vals = [v if type(v) is float else json_number(v) for v in raw]
        except Unusable:
            pass
        else:
            if clean(vals):
                note("nan", data)
            return vals
    vals, odd, bad = [], [], False
    for ch, v in zip(channels, raw):
        if v is ABSENT:
            vals.append(NAN)
            continue
        try:
            f = v if type(v) is float else json_number(v)
        except Unusable:
            vals.append(NAN)
            odd.append(f"{ch}={json.dumps(v)[:24]}")
            continue
        if not -FLT_MAX <= f <= FLT_MAX:
            f, bad = NAN, True
        vals.append(f)
    if odd:
        note("non_numeric_value", data, named(odd))
    if bad:
        note("nan", data)
    return vals
