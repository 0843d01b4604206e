"""`timestamp: auto`: how a stream's CSV lines come to be read with or without a leading
timestamp.

A line of C + 1 fields has the timestamp shape, one of C fields the plain shape.  One
line cannot be trusted to tell: a serial port opened while the device is mid-line
delivers the tail of a timestamped line, which has C fields, and an MQTT device may send
its first message before its clock is set.  So a stream decides only when DECIDE_AFTER
valid lines in a row (lines that are samples of their shape; refused lines do not
count) have the same shape.  Until then its valid lines are held, not passed on: at the
decision the held lines of the chosen shape come out in arrival order, and the others
are refused as `field_count`.

A decided stream reads lines of its shape at full speed.  A valid line of the other
shape is held again; a line of the decided shape refuses the held ones (`field_count`:
line noise, such as a lost or an extra `,`), and REDECIDE_AFTER of them in a row decide
again (the device was reflashed or reconfigured), logged, the held lines coming out.
A stream holds at most HOLD_MAX lines; the oldest beyond that is refused.  A stream
that decides on the plain shape forgets its device clock (there is none to follow).

A device one channel short or over sends lines of the other shape's field count: a
timestamp and C - 1 values are C fields, read as C values (`non_numeric` at an ISO
timestamp; an epoch number is a value like any other, so a decision on the plain shape
whose held lines all start with a number in the epoch ranges of agent/timestamps.py is
warned about: no sensor reads 1.7e9), and C + 1 values are read as a timestamp and C
values (`bad_timestamp`).
Such a refusal says how the line was read and how many channels the model has
(`misread`), so that it does not pass for an unsupported number or date format.
"""
from __future__ import annotations

import logging
import math

from .bad_input import BadInput
from .device_clock import Clock
from .field_values import Unusable
from .timestamps import BadTimestamp, epoch_seconds

log = logging.getLogger("tsad.decode")

DECIDE_AFTER = 3        # a torn first line and one more bad line cannot outvote these
REDECIDE_AFTER = 10     # line noise rarely repeats 10 times in a row; a new format does
HOLD_MAX = 16           # lines of either shape held while a stream has not decided


class Held(Exception):
    """A valid line that the stream's decision does not (yet) cover."""

    def __init__(self, has_ts: bool, t: float, vals: list[float]):
        self.has_ts, self.t, self.vals = has_ts, t, vals


def hold(clock: Clock, h: Held, line: bytes, report: BadInput, ts: list, rows: list) -> None:
    """Hold a line; decide when the lines in a row of its shape are enough, appending the
    samples that come out to `ts` and `rows`."""
    held = clock.held
    if held is None:
        held = clock.held = []
    held.append((h.has_ts, h.t, h.vals, line[:80]))
    run = 0
    for entry in reversed(held):
        if entry[0] != h.has_ts:
            break
        run += 1
    need = DECIDE_AFTER if clock.has_ts is None else REDECIDE_AFTER
    if run >= need:
        _decide(clock, h.has_ts, report, ts, rows)
    elif len(held) > HOLD_MAX:
        _refuse(report, held.pop(0), clock.has_ts, f"over {HOLD_MAX} lines held undecided")


def refuse_held(clock: Clock, report: BadInput) -> None:
    """A valid line of the decided shape came: the lines held before it were noise."""
    held, clock.held = clock.held, None
    for entry in held:
        _refuse(report, entry, clock.has_ts)
    if clock.has_ts is False:      # held timestamped lines moved a clock that is not used
        clock.last, clock.behind = None, 0


def _decide(clock: Clock, has_ts: bool, report: BadInput, ts: list, rows: list) -> None:
    was = clock.has_ts
    held, clock.held, clock.has_ts = clock.held, None, has_ts
    if not has_ts:
        clock.last, clock.behind = None, 0
    if not has_ts:
        _first_field_a_time(held, report)
    for entry in held:
        shape, t, vals, snippet = entry
        if shape != has_ts:
            _refuse(report, entry, has_ts)
            continue
        ts.append(t)
        rows.append(vals)
        if any(map(math.isnan, vals)):
            report.note("nan", snippet)
    if was is not None:
        more = report.may_log("timestamp_decision")
        if more is not None:        # many streams changing at once: one line per 10 s
            log.warning("%s: %d lines in a row %s a leading timestamp: reading lines %s "
                        "one from now on%s", report.log_name, REDECIDE_AFTER,
                        "carry" if has_ts else "lack", "with" if has_ts else "without",
                        f" (+{more} more streams)" if more else "")


def _first_field_a_time(held: list, report: BadInput) -> None:
    """Warn when every held line of the plain shape starts with what reads as a time: a
    device sending a timestamp and one value too few, every value one channel off."""
    firsts = [vals[0] for shape, _, vals, _ in held if not shape]
    try:
        for v in firsts:
            epoch_seconds(v)
    except BadTimestamp:
        return
    if firsts and report.may_log("first_field_time") is not None:
        c = len(held[0][2])
        log.warning("%s: lines of %d fields are read as %d values without a timestamp, but "
                    "their first field reads as a time (%.10g): if the device sends a "
                    "timestamp and one value too few, every value is one channel off; send "
                    "exactly the model's %d channels", report.log_name, c, c, firsts[0], c)


def _refuse(report: BadInput, entry: tuple, decided: bool | None, detail: str = "") -> None:
    shape, _, vals, snippet = entry
    c = len(vals)
    report.note("field_count", snippet, detail or f"{c + shape} fields, expected {c + decided}")


def misread(e: Unusable, mode: str, fields: list[str], has_ts: bool, decided: bool,
            c: int) -> Unusable:
    """`e`, a line of C or C + 1 `fields` refused when read with (`has_ts`) or without a
    timestamp, with its detail saying so under `timestamp: auto`: by the stream's
    decision (`decided`) or by the line's own field count (undecided).  A timestamp that
    parses but that the stream's clock refuses is a clock problem: `e` as it is."""
    if mode != "auto" or e.reason not in ("non_numeric", "bad_timestamp"):
        return e
    if e.reason == "bad_timestamp":
        try:
            epoch_seconds(fields[0])
            return e
        except BadTimestamp:
            pass
    n = len(fields)
    how = f"a timestamp and {n - 1} values" if has_ts else f"{n} values without a timestamp"
    why = "by the stream's decision" if decided else "by the field count"
    said = f"{e.detail}; " if e.detail else ""
    return Unusable(e.reason, f"{said}timestamp auto, {why}: {n} fields read as {how}; "
                              f"the model has {c} channels")
