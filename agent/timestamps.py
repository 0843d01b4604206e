"""One rule for reading a timestamp from a device, a file or an API request, and one
way of writing one (`iso_utc`: ISO 8601 in UTC with milliseconds, in every payload).

A timestamp is valid only inside [2000-01-01, 2100-01-01) UTC.  Anything
outside is a fault, not data: a device that lost its RTC (1970), a corrupted
digit, or a unit misread as another would otherwise carry an absurd year into
alert ids and ISO formatting (which raises for years past 9999).

Numbers (and numeric strings) are epoch time in seconds, milliseconds,
microseconds or nanoseconds; the unit is the one that puts the value inside
the valid range.  The four ranges, [9.5e8, 4.1e9) s, [9.5e11, 4.1e12) ms,
[9.5e14, 4.1e15) µs and [9.5e17, 4.1e18) ns, do not overlap, so the rule is
never ambiguous; a number between them is invalid.  A numeric string must be
a plain ASCII decimal number ("1700000000", "1.7e9"): Python's float() would
also take "1_700_000_000" and non-ASCII digits, which no device means.

Text that is not a number is ISO 8601 as `datetime.fromisoformat` reads it
("2024-05-01T12:00:00Z", "+02:00" offsets, "2024-05-01 12:00:00"); a time
without a zone is UTC.  The result must fall in the same range.

bool, NaN, inf, integers too large for a float and every other type are
invalid.  `epoch_seconds` raises `BadTimestamp` (a ValueError) for an invalid
value; `epoch_seconds_array` returns NaN in its place, so a column is checked
in one vectorised pass.

A file's numeric time column (`file_seconds`, for contract.read_table) follows the
same rule, with one exception a device has no use for: a column whose values all
lie in [0, MIN_EPOCH_S) counts seconds (or steps) from its own start, as PaddleX's
integer time index does, and is kept as it is.  Any other column is epoch time, so
epoch milliseconds are never taken for seconds, and a negative value, or one
between the unit ranges or outside 2000-2100, is invalid.
"""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np

MIN_EPOCH_S = 946_684_800       # 2000-01-01T00:00:00Z
MAX_EPOCH_S = 4_102_444_800     # 2100-01-01T00:00:00Z, exclusive

# (divisor to seconds, lower bound, upper bound) per unit; integer bounds keep the
# comparisons exact for Python ints of any size.
UNITS = tuple((scale, MIN_EPOCH_S * scale, MAX_EPOCH_S * scale)
              for scale in (1, 1_000, 1_000_000, 1_000_000_000))


class BadTimestamp(ValueError):
    """A value that is not a timestamp inside [MIN_EPOCH_S, MAX_EPOCH_S)."""


def epoch_seconds(value) -> float:
    """Epoch seconds from an int, a float or a string; raises BadTimestamp."""
    if isinstance(value, bool):
        raise BadTimestamp(f"not a timestamp: {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(_from_number(value))
    if isinstance(value, str):
        return _from_text(value)
    raise BadTimestamp(f"not a timestamp: {type(value).__name__}")


def epoch_seconds_array(a: np.ndarray) -> np.ndarray:
    """float64 epoch seconds for a numeric array (same shape); NaN where invalid, and
    everywhere for a non-numeric dtype (bool, text).  float64 keeps about 0.25 µs of an
    epoch time, so int64 nanoseconds come back rounded to that."""
    a = np.asarray(a)
    out = np.full(a.shape, np.nan)
    if a.dtype.kind not in "iuf":
        return out
    x = a.astype(np.float64, copy=False)
    for scale, lo, hi in UNITS:
        m = (x >= lo) & (x < hi)
        out[m] = x[m] / scale
    return out


def file_seconds(a: np.ndarray) -> np.ndarray:
    """float64 seconds of a file's numeric time column (see above): relative as it is,
    else epoch by the unit rule; NaN where a value is invalid (or missing)."""
    a = np.asarray(a)
    if a.dtype.kind not in "iuf":
        return np.full(a.shape, np.nan)
    x = a.astype(np.float64)
    known = x[~np.isnan(x)]
    if len(known) and known.min() >= 0 and known.max() < MIN_EPOCH_S:
        return x
    return epoch_seconds_array(a)


def iso_utc(ts: float) -> str | None:
    """ISO 8601 UTC with milliseconds; None for a time no calendar can show (the decoders
    refuse such timestamps, but a replayed file or an API caller may still bring one)."""
    try:
        return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds") \
            .replace("+00:00", "Z")
    except (ValueError, OverflowError, OSError):
        return None


def _from_number(v):
    for scale, lo, hi in UNITS:
        if lo <= v < hi:        # NaN fails every comparison; inf is above every bound
            return v / scale
    raise BadTimestamp(f"timestamp out of range: {v!r}")


def _from_text(s: str) -> float:
    s = s.strip()
    if not s.isascii() or "_" in s:
        raise BadTimestamp(f"not a timestamp: {s[:40]!r}")
    try:
        v = float(s)
    except ValueError:
        pass
    else:
        return _from_number(v)
    try:
        # Python 3.10's fromisoformat does not take the "Z" suffix
        dt = datetime.fromisoformat(s[:-1] + "+00:00" if s.endswith(("Z", "z")) else s)
    except ValueError:
        raise BadTimestamp(f"not a timestamp: {s[:40]!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    try:
        ts = dt.timestamp()
    except (OverflowError, ValueError):     # year 1 with a negative offset, say
        raise BadTimestamp(f"timestamp out of range: {s[:40]!r}") from None
    if not (MIN_EPOCH_S <= ts < MAX_EPOCH_S):
        raise BadTimestamp(f"timestamp out of range: {s[:40]!r}")
    return ts

