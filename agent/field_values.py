"""How one field of a sample becomes a float, by the rules of agent/decoders.py.

A JSON value is a number, a numeric string or null; a CSV field is what float() reads
from plain ASCII.  An explicit missing value (MISSING_TOKENS, null) is NaN, and so is
any value float32 cannot hold (`clean`): the ring buffer forward-fills NaN, and the
decoder counts reason "nan" once for the sample.  Anything else raises `Unusable` with
the reason the decoder counts.
"""
from __future__ import annotations

import math

import numpy as np

MISSING_TOKENS = frozenset({"", "nan", "null", "none", "na", "n/a"})
FLT_MAX = float(np.finfo(np.float32).max)
NAN = math.nan


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


def csv_values(fields: list[str]) -> list[float]:
    """CSV fields as floats, missing tokens as NaN."""
    try:
        return [float(f) for f in fields]
    except ValueError:
        return [missing_or_float(f) for f in fields]


def missing_or_float(f: str) -> float:
    """A CSV field float() refused: NaN when it is a missing token."""
    try:
        return float(f)
    except ValueError:
        if f.strip().lower() in MISSING_TOKENS:
            return NAN
        raise Unusable("non_numeric") from None
