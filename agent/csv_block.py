"""Well-formed CSV payloads of many streams read as one block: the decoders' fast path.

A drain of MQTT messages is mostly lines of one shape: an epoch timestamp (or none) and
C plain decimal numbers, separated by commas.  Read line by line, each costs a dozen
Python calls; read as a block, the whole drain costs a few passes over its joined bytes
(one character check, one split, one float conversion, the timestamp rule and the
device-clock checks as array operations) and a few Python steps per stream.

This path decides nothing on its own.  It takes a stream's lines only when every one of
them is a sample that `decoders.LineDecoder` would accept whole, with no count and no
log line; any stream with anything else (a `;` separator, whitespace, an empty line, a
missing value, an ISO timestamp, a wrong field count, a value float32 cannot hold, a
timestamp out of range, ahead of this machine or not in order), and any stream whose
`timestamp: auto` decision is not made or holds lines (csv_auto.py), is left to the line
reader; a block it cannot split into lines at all is left whole.  Timestamps must
not decrease within a stream's lines here (the line reader's rule allows jitter of up to
BACKWARD_TOLERANCE_S, and takes such streams); then each line is accepted exactly when
the line reader would accept it, so both give the same samples, bit for bit
(tests/test_decode_streams.py compares them).
"""
from __future__ import annotations

from itertools import repeat

import numpy as np

from .device_clock import FUTURE_TOLERANCE_S, JUMP_S, Clock
from .field_values import FLT_MAX
from .timestamps import epoch_seconds_array

# The bytes lines of plain decimal numbers separated by commas may hold.
_NUMBER_BYTES = np.zeros(256, bool)
_NUMBER_BYTES[list(b"0123456789.eE+-,\n")] = True
_NL, _COMMA = ord("\n"), ord(",")


class Block:
    """What a block read: `take(i)` is stream i's (ts, values), or None when stream i is
    left to the line reader."""

    def __init__(self, ts: np.ndarray, values: np.ndarray, bounds: list[int],
                 taken: list[int | None]):
        # taken[i]: stream i's place among the streams read, None for one left out
        self.ts, self.values, self.bounds, self.taken = ts, values, bounds, taken

    def take(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        j = self.taken[i]
        if j is None:
            return None
        a, b = self.bounds[j], self.bounds[j + 1]
        return self.ts[a:b], self.values[a:b]


class _Part:
    """The streams still in the block: their payloads, arrivals, payload counts, clocks
    and places among all the block's streams."""

    def __init__(self, payloads, arrivals, per_stream, clocks, index, n):
        self.payloads, self.arrivals, self.per_stream = payloads, arrivals, per_stream
        self.clocks, self.index, self.n = clocks, index, n

    def keep(self, good: list[bool]) -> "_Part":
        cut = np.cumsum([0, *self.per_stream]).tolist()
        pick = [i for i, g in enumerate(good) if g]
        return _Part([p for i in pick for p in self.payloads[cut[i]:cut[i + 1]]],
                     [a for i in pick for a in self.arrivals[cut[i]:cut[i + 1]]],
                     [self.per_stream[i] for i in pick], [self.clocks[i] for i in pick],
                     [self.index[i] for i in pick], self.n)


def read_block(payloads: list[bytes], arrivals: list[float], per_stream: list[int],
               clocks: list[Clock], channels: int, timestamp: str,
               max_line: int, mono: float) -> Block | None:
    """Payloads of consecutive streams (stream i has the next `per_stream[i]` payloads,
    `arrivals` one time per payload), each a line or lines; None when no stream's lines
    are all such samples.  The clocks of the streams taken are updated as the line
    reader would update them; `mono`: this machine's monotonic time, for them."""
    part = _Part(payloads, arrivals, per_stream, clocks, list(range(len(per_stream))),
                 len(per_stream))
    # each round leaves out the streams with a line of another shape, then those with a
    # field float() refuses ("1e", "--1"): the rest are read as one block
    for _ in range(3):
        shape = _shape(part.payloads, part.per_stream, max_line)
        if shape is None:
            return None
        nf, good, bounds, lines = shape
        if all(good):
            rows = _numbers(part.payloads, nf, bounds)
            if type(rows) is np.ndarray:
                break
            good = rows
        part = part.keep(good)
        if not part.index:
            return None
    else:
        return None
    has_ts = {"first": True, "none": False}.get(timestamp, nf == channels + 1)
    if nf != channels + has_ts:
        return None
    values = rows[:, has_ts:]
    arrival = np.repeat(np.asarray(part.arrivals, np.float64), lines)
    bad = ~(np.abs(values) <= FLT_MAX).all(axis=1)     # NaN/inf/huge: the reader writes NaN
    if has_ts:
        ts = epoch_seconds_array(rows[:, 0])      # NaN where epoch_seconds raises
        limit = arrival + FUTURE_TOLERANCE_S
        if any(c.lead for c in part.clocks):
            limit += np.repeat([c.lead for c in part.clocks], np.diff(bounds))
        bad |= ~(ts <= limit)               # NaN (no valid epoch) included
        step = np.zeros(len(ts))
        step[1:] = ts[1:] - ts[:-1]
        step[bounds[:-1]] = 0.0            # a stream's first line is checked against its clock
        # a longer step is the line reader's: its tolerance, or a stream's first interval
        bad |= (step < 0) | (step > JUMP_S)
    else:
        ts = arrival
    ok = _by_stream(bad, bounds) == 0
    taken = _settle_clocks(part, ok.tolist(), bounds, ts, has_ts, arrival, mono)
    if all(t is None for t in taken):
        return None
    with np.errstate(over="ignore"):    # the huge values of streams not taken
        return Block(ts, values.astype(np.float32), bounds.tolist(), taken)


def _settle_clocks(part: _Part, ok: list[bool], bounds: np.ndarray, ts: np.ndarray,
                   has_ts: bool, arrival: np.ndarray, mono: float) -> list[int | None]:
    """Check each stream's first timestamp against its clock and update the clocks of the
    streams taken; each stream's place in the block (None: left to the line reader)."""
    taken: list[int | None] = [None] * part.n
    first, last = bounds[:-1].tolist(), (bounds[1:] - 1).tolist()
    tsl = ts.tolist() if has_ts else None
    for j, clock in enumerate(part.clocks):
        if not ok[j] or clock.has_ts is not has_ts or clock.held:
            continue
        if has_ts:
            a, b = first[j], last[j]
            # a stream with a step pending, or whose first line the clock would refuse or
            # follow, is the line reader's: it counts and logs
            if not clock.plain(tsl[a], mono):
                continue
            if clock.lead:
                if not clock.lead_allows(tsl[a:b + 1], arrival[a:b + 1].tolist()):
                    continue
                for i in range(a, b + 1):
                    clock.keep(tsl[i], float(arrival[i]), mono)
            else:
                _keep_lines(clock, tsl, a, b, mono)
        taken[part.index[j]] = j
    return taken


def _keep_lines(clock: Clock, tsl: list[float], a: int, b: int, mono: float) -> None:
    """Keep lines a..b, which do not decrease, as keeping each would: the one before the
    last step up (for the interval that step ends) and the last are enough.  No lead
    to shrink: the arrival times do not matter."""
    k = b
    while k > a and tsl[k - 1] >= tsl[k]:
        k -= 1
    if k > a:
        clock.keep(tsl[k - 1], 0.0, mono)
    clock.keep(tsl[k], 0.0, mono)
    if k < b:
        clock.keep(tsl[b], 0.0, mono)


def _shape(payloads: list[bytes], per_stream: list[int], max_line: int):
    """(fields per line, whether each stream's lines all have that many fields, none of
    them empty, and hold only numbers and commas, each stream's first line and the end,
    lines per payload); None when no line has that shape.  The field count is the first
    such line's."""
    raw = np.frombuffer(b"\n".join(payloads), np.uint8)
    if not len(raw):
        return None
    nl, comma = raw == _NL, raw == _COMMA
    ends = np.flatnonzero(nl)
    starts = np.concatenate(([0], ends + 1))
    ends = np.append(ends, len(raw))
    lengths = ends - starts
    bad = (lengths == 0) | (lengths > max_line)
    # (an empty line's start may be the end of the blob: its count is never read)
    commas = np.add.reduceat(comma.view(np.int8), np.minimum(starts, len(raw) - 1),
                             dtype=np.int64)
    # a byte no number holds, or an empty field (a comma at a line's start or end, or
    # before another comma: float() would refuse it too, but a stream that sends empty
    # fields leaves here rather than in _numbers' field-by-field search in every drain)
    wrong = ~_NUMBER_BYTES[raw]
    wrong[:-1] |= comma[:-1] & (comma[1:] | nl[1:])
    wrong[0] |= comma[0]
    wrong[-1] |= comma[-1]
    wrong[1:] |= nl[:-1] & comma[1:]
    at = np.flatnonzero(wrong)
    if len(at):
        bad[np.searchsorted(starts, at, "right") - 1] = True
    good = np.flatnonzero(~bad)
    if not len(good):
        return None
    nf = int(commas[good[0]]) + 1
    bad |= commas != nf - 1
    if len(starts) == len(payloads):        # a line per payload (the joins' newlines only)
        lines = np.ones(len(payloads), np.int64)
    else:
        lines = np.fromiter(map(bytes.count, payloads, repeat(b"\n")), np.int64,
                            len(payloads)) + 1
    bounds = np.concatenate(([0], np.cumsum(lines)[np.cumsum(per_stream) - 1]))
    return nf, (_by_stream(bad, bounds) == 0).tolist(), bounds, lines


def _numbers(payloads: list[bytes], nf: int, bounds: np.ndarray) -> np.ndarray | list[bool]:
    """The fields as float64 [lines, nf], read by float() as the line reader reads them;
    or, when float() refuses some, whether each stream has none of those."""
    fields = b",".join(payloads).replace(b"\n", b",").split(b",")
    try:
        return np.fromiter(map(float, fields), np.float64, len(fields)).reshape(-1, nf)
    except ValueError:
        pass
    bad = np.zeros(int(bounds[-1]), bool)
    for k, f in enumerate(fields):
        try:
            float(f)
        except ValueError:
            bad[k // nf] = True
    return (_by_stream(bad, bounds) == 0).tolist()


def _by_stream(bad: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """How many of each stream's lines are bad (lines bounds[i]:bounds[i + 1])."""
    return np.add.reduceat(bad.view(np.int8), bounds[:-1], dtype=np.int64)
