"""LineDecoder and the timestamp rule: every input is either a sample or exactly one
counted reason; nothing raises; no timestamp outside 2000-2100 gets through."""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from itertools import takewhile

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from agent.csv_auto import DECIDE_AFTER, HOLD_MAX, REDECIDE_AFTER
from agent.decoders import FATAL_REASONS, MAX_LINE, LineDecoder
from agent.device_clock import (BACKWARD_TOLERANCE_S, FUTURE_TOLERANCE_S, JUMP_S,
                                MAX_TRACKED_STREAMS, RESYNC_AFTER)
from agent.metrics import Metrics
from agent.timestamps import (MAX_EPOCH_S, MIN_EPOCH_S, BadTimestamp, epoch_seconds,
                              epoch_seconds_array)

CH = ["a", "b", "c"]
NOW = 1_700_000_000.0
T0 = 1_699_999_000.0          # device timestamps a little before NOW


def make(protocol="csv", timestamp="auto", channels=CH):
    m = Metrics()
    return LineDecoder(channels, protocol, timestamp, m, "test"), m


def fatal(m: Metrics) -> int:
    return sum(v for k, v in m.malformed.items() if k in FATAL_REASONS)


def valid_ts(ts) -> bool:
    return ts == NOW or MIN_EPOCH_S <= ts < MAX_EPOCH_S


def check_result(res, before: int, m: Metrics, c: int = len(CH)):
    """A None result adds exactly one fatal reason; a sample adds none and is well formed."""
    if res is None:
        assert fatal(m) == before + 1
    else:
        assert fatal(m) == before
        ts, v = res
        assert isinstance(ts, float) and valid_ts(ts)
        assert v.dtype == np.float32 and v.shape == (c,)
        assert not np.isinf(v).any()


def check_payload(out, c: int = len(CH)):
    if out is not None:
        ts, v = out
        assert ts.dtype == np.float64 and v.dtype == np.float32
        assert v.shape == (len(ts), c) and len(ts) >= 1
        assert all(valid_ts(t) for t in ts.tolist()) and not np.isinf(v).any()


def held(d: LineDecoder, stream=None) -> int:
    return len(d._clocks.get(stream).held or ())


def check_line(d: LineDecoder, m: Metrics, line: bytes, stream=None):
    """Decode one line: it is a sample, one counted fatal reason, or held (`auto`, until
    its stream decides), and a decision releases or refuses what was held, so the
    samples out + the refusals + the change in held lines is always 1."""
    before, held_before = fatal(m), held(d, stream)
    out = d.decode_lines([line], NOW, stream)
    check_payload(out)
    n = 0 if out is None else len(out[0])
    assert n + fatal(m) - before + held(d, stream) - held_before == 1, (line, out, m.malformed)
    return out


# ---------------------------------------------------------------- timestamps
@pytest.mark.parametrize("value", [1_700_000_000, 1_700_000_000.0, 1_700_000_000_000,
                                   1.7e15, 1_700_000_000_000_000_000, np.int64(1.7e12),
                                   "1700000000", " 1.7e12 ", "1700000000000000",
                                   "2023-11-14T22:13:20Z", "2023-11-14T23:13:20+01:00",
                                   "2023-11-14 22:13:20", "2023-11-14T22:13:20"])
def test_epoch_seconds_units_and_iso_name_the_same_instant(value):
    assert epoch_seconds(value) == pytest.approx(1_700_000_000.0, abs=1e-6)


@pytest.mark.parametrize("value", [
    0, -1, -1.7e9, 1e30, 10**30, 10**400, math.nan, math.inf, -math.inf, True, False, None,
    [1.7e9], b"1700000000", 4.2e9, 1e11, 5e13, 5e16, 5e18,       # between / above the ranges
    MAX_EPOCH_S, MIN_EPOCH_S - 1, MIN_EPOCH_S * 1000 - 1, MAX_EPOCH_S * 10**9,
    "1_700_000_000", "\u0661\u0667\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660",
    "\uff11\uff17\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff10", "", "soon", "nan",
    "1970-01-01T00:00:00Z", "2100-01-01T00:00:00Z", "1999-12-31T23:59:59Z",
    "0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"])
def test_epoch_seconds_refuses(value):
    with pytest.raises(BadTimestamp):
        epoch_seconds(value)
    assert issubclass(BadTimestamp, ValueError)


def test_epoch_seconds_range_edges():
    assert epoch_seconds(MIN_EPOCH_S) == MIN_EPOCH_S
    assert epoch_seconds(MIN_EPOCH_S * 10**9) == MIN_EPOCH_S
    assert epoch_seconds(MAX_EPOCH_S - 1) == MAX_EPOCH_S - 1
    assert epoch_seconds("2099-12-31T23:59:59Z") == MAX_EPOCH_S - 1


unit_value = st.sampled_from([1, 10**3, 10**6, 10**9]).flatmap(
    lambda s: st.floats(MIN_EPOCH_S * s, MAX_EPOCH_S * s, exclude_max=True).map(lambda v: (s, v)))


@settings(max_examples=300, deadline=None)
@given(unit_value)
def test_each_unit_range_reads_as_that_unit(sv):
    scale, v = sv
    assert epoch_seconds(v) == v / scale
    assert MIN_EPOCH_S <= epoch_seconds(v) < MAX_EPOCH_S


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(), unit_value.map(lambda sv: sv[1]),
                          st.integers(-2**63, 2**63 - 1).map(float)), max_size=20))
def test_array_rule_equals_scalar_rule(values):
    got = epoch_seconds_array(np.array(values, np.float64))
    assert got.dtype == np.float64 and got.shape == (len(values),)
    for v, g in zip(values, got.tolist()):
        try:
            want = epoch_seconds(v)
        except BadTimestamp:
            assert math.isnan(g), v
        else:
            assert g == want, v


def test_array_rule_ints_and_non_numeric():
    ns = np.array([1_700_000_000_123_456_789, -5, 0], np.int64)
    got = epoch_seconds_array(ns)
    assert got[0] == pytest.approx(1_700_000_000.123457, abs=1e-6)
    assert np.isnan(got[1:]).all()
    assert np.isnan(epoch_seconds_array(np.array([True, False]))).all()
    assert np.isnan(epoch_seconds_array(np.array(["1700000000"]))).all()


# ---------------------------------------------------------------- CSV, examples
@pytest.mark.parametrize("line, ts, values", [
    (b"1,2,3", NOW, [1, 2, 3]),
    (b" 1.5 ; -2e3 ; 3 \r", NOW, [1.5, -2000, 3]),
    (b"1583764481,1,2,3", 1583764481.0, [1, 2, 3]),
    (b"1583764481500,1,2,3", 1583764481.5, [1, 2, 3]),          # epoch milliseconds
    (b"1583764481500250,1,2,3", 1583764481.50025, [1, 2, 3]),   # epoch microseconds
    (b"1583764481500250000,1,2,3", 1583764481.50025, [1, 2, 3]),  # epoch nanoseconds
    (b"2020-03-09 14:34:41;1;2;3", 1583764481.0, [1, 2, 3]),    # SKAB style, naive = UTC
    (b"2020-03-09T16:34:41+02:00,1,2,3", 1583764481.0, [1, 2, 3]),
    (b"2020-03-09T14:34:41Z,1,2,3", 1583764481.0, [1, 2, 3]),
])
def test_csv_valid(line, ts, values):
    d, m = make()
    got = d.decode_lines([line] * 3, NOW)       # `auto` decides on 3 lines that agree
    assert got is not None and len(got[0]) == 3
    assert got[0].tolist() == pytest.approx([ts] * 3)
    np.testing.assert_array_equal(got[1], np.array([values] * 3, np.float32))
    assert sum(m.malformed.values()) == 0


@pytest.mark.parametrize("line, reason", [
    (b"", "empty"),
    (b"  \r", "empty"),
    (b"1,2", "field_count"),
    (b"1,2,3,4,5", "field_count"),
    (b"1,x,3", "non_numeric"),
    (b"1_000,2,3", "non_numeric"),
    ("\u0661,2,3".encode(), "non_numeric"),                        # Arabic-Indic one
    ("\uff11,2,3".encode(), "non_numeric"),                        # fullwidth one
    (b"1,2,3\xff", "non_utf8"),
    (b"yesterday,1,2,3", "bad_timestamp"),
    (b"nan,1,2,3", "bad_timestamp"),
    (b"-1700000000,1,2,3", "bad_timestamp"),
    (b"1e30,1,2,3", "bad_timestamp"),
    (b"55840,1,2,3", "bad_timestamp"),
    (b"1970-01-01T00:00:01Z,1,2,3", "bad_timestamp"),
    pytest.param(b"1," * (MAX_LINE // 2) + b"1", "too_long", id="too_long"),
    (b"Accelerometer;Current;Pressure", "non_numeric"),   # a header line
])
def test_csv_unusable(line, reason):
    d, m = make()
    assert d.decode(line, NOW) is None
    assert m.malformed == Counter({reason: 1})


def test_csv_missing_values_keep_the_sample():
    d, m = make()
    lines = [b"1,nan,3", b"1,,3", b"1,inf,3", b"1,NULL,3", b"1,1e300,3", b"1,3.5e38,3",
             b"1, n/a ,3"]
    assert d.decode(lines[0], NOW) is None                  # held: `auto` has not decided
    assert m.malformed == Counter()                         # nor counted "nan" yet
    got = d.decode_lines(lines[1:], NOW)
    assert len(got[0]) == len(lines)                        # the held line came out first
    np.testing.assert_array_equal(got[1], np.array([[1, np.nan, 3]] * 7, np.float32))
    assert m.malformed == Counter({"nan": 7})


def test_csv_timestamp_modes():
    d, m = make(timestamp="first")
    assert d.decode(b"1,2,3", NOW) is None                  # no room for a timestamp
    assert d.decode(b"1699999999,1,2,3", NOW)[0] == 1699999999.0
    d2, m2 = make(timestamp="none")
    assert d2.decode(b"1699999999,1,2,3", NOW) is None
    assert d2.decode(b"1,2,3", NOW)[0] == NOW
    assert m.malformed == m2.malformed == Counter({"field_count": 1})


def test_auto_mode_decides_when_three_valid_lines_agree():
    d, m = make()
    # garbage, a bad timestamp and a header neither decide the mode nor are held
    for junk in (b"1,2,3,4", b"x,y,z", b"\xff\xfe", b"1,2"):
        assert d.decode(junk, NOW) is None
    assert m.malformed == Counter({"bad_timestamp": 1, "non_numeric": 1, "non_utf8": 1,
                                   "field_count": 1})
    # the torn tail of a timestamped line (a serial port opened mid-line) is held, and
    # so are the good lines after it until three agree: then they come out together
    assert d.decode(b"5,1.5,2", NOW) is None
    assert d.decode(b"1699999999.4,1.5,2,3", NOW) is None
    assert d.decode(b"1699999999.5,1.5,2,3", NOW) is None
    assert sum(m.malformed.values()) == 4                   # nothing counted while held
    ts, v = d.decode_lines([b"1699999999.6,1.5,2,3"], NOW)
    assert ts.tolist() == [1699999999.4, 1699999999.5, 1699999999.6]
    np.testing.assert_array_equal(v, np.array([[1.5, 2, 3]] * 3, np.float32))
    assert m.malformed["field_count"] == 2                  # the torn tail, refused now
    # decided: one corrupted "." -> ",": 5 fields; counted, not read as a 1970
    # timestamp + shifted values
    assert d.decode(b"1699999999,6,1.5,2,3", NOW) is None
    assert d.decode(b"1.5,2,3", NOW) is None                # the other shape: held
    assert d.decode(b"0,5", NOW) is None                    # of neither: refused at once
    assert m.malformed["field_count"] == 4
    ts, v = d.decode(b"1699999999.7,1.5,2,3", NOW)          # decided shape: straight out
    assert ts == 1699999999.7
    np.testing.assert_array_equal(v, np.array([1.5, 2, 3], np.float32))
    assert m.malformed == Counter({"bad_timestamp": 1, "non_numeric": 1, "non_utf8": 1,
                                   "field_count": 5})      # ... and the held line refused


def test_auto_mode_without_timestamps():
    d, m = make()
    got = d.decode_lines([b"1,2,3", b"4,5,6", b"7,8,9"], NOW)   # decides: no timestamp
    assert got[0].tolist() == [NOW] * 3 and got[1][:, 0].tolist() == [1, 4, 7]
    assert d.decode(b"1,2,3", NOW + 1)[0] == NOW + 1
    assert d.decode(b"1699999999,1,2,3", NOW) is None       # held, then refused by ...
    assert d.decode(b"0,5,2,3", NOW) is None                # "0.5" -> "0,5": refused
    assert d.decode(b"1,2,3", NOW)[0] == NOW                # ... this one
    assert m.malformed == Counter({"field_count": 2})


def test_auto_mode_decides_again_after_ten_lines_of_the_other_shape(caplog):
    d, m = make()
    assert len(d.decode_lines([f"{T0 + 50},1,2,3".encode(), b"1,2,3", b"1,2,3",
                               b"1,2,3"], NOW)[0]) == 3     # plain; the timestamped refused
    # the device now stamps its lines, earlier than the refused line: the stream's clock
    # was forgotten with the plain decision, so these are not "behind the stream"
    lines = [f"{T0 + i},{i},2,3".encode() for i in range(REDECIDE_AFTER + 2)]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        for line in lines[:REDECIDE_AFTER - 1]:
            assert d.decode(line, NOW) is None
        ts, v = d.decode_lines(lines[REDECIDE_AFTER - 1:], NOW)
    assert ts.tolist() == [T0 + i for i in range(REDECIDE_AFTER + 2)]
    assert v[:, 0].tolist() == list(range(REDECIDE_AFTER + 2))
    assert m.malformed == Counter({"field_count": 1})
    assert [r.getMessage() for r in caplog.records] == [
        f"test: {REDECIDE_AFTER} lines in a row carry a leading timestamp: reading lines "
        "with one from now on"]
    assert d.decode(b"1,2,3", NOW) is None                  # now the plain line is held


def test_auto_mode_lines_that_never_agree_are_held_at_most_hold_max():
    d, m = make()
    for k in range(40):         # alternating shapes: never DECIDE_AFTER in a row
        line = f"{T0 + k},1,2,3" if k % 2 else "1,2,3"
        assert d.decode_lines([line.encode()], NOW, "s") is None
    assert d._clocks.get("s").held is not None and len(d._clocks.get("s").held) == HOLD_MAX
    assert m.malformed == Counter({"field_count": 40 - HOLD_MAX})
    assert d._clocks.get("other").has_ts is None            # streams decide on their own


def test_backward_and_future_timestamps_are_refused():
    d, m = make(timestamp="first")
    assert d.decode(f"{T0},1,2,3".encode(), NOW) is not None
    back = T0 - BACKWARD_TOLERANCE_S * 0.9                  # jitter / NTP slew: kept
    assert d.decode(f"{back},1,2,3".encode(), NOW)[0] == back
    assert d.decode(f"{T0 - 10},1,2,3".encode(), NOW) is None                  # corrupted digit
    assert d.decode(f"{NOW + FUTURE_TOLERANCE_S + 60},1,2,3".encode(), NOW) is None
    # the stream's clock did not move: the next good line follows T0
    assert d.decode(f"{T0 + 0.01},1,2,3".encode(), NOW)[0] == T0 + 0.01
    assert m.malformed == Counter({"bad_timestamp": 2})
    local_time = NOW + 14 * 3600                            # UTC+14 sent as UTC: allowed
    assert d.decode_payload(f"{local_time},1,2,3".encode(), NOW, "tz")[0][0] == local_time


def test_a_real_clock_step_back_is_followed(caplog):
    d, m = make("json")
    assert d.decode(json.dumps({"ts": T0, "values": [1, 2, 3]}).encode(), NOW) is not None
    stepped = [T0 - 3600 + i for i in range(RESYNC_AFTER + 2)]
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        got = [d.decode(json.dumps({"ts": t, "values": [1, 2, 3]}).encode(), NOW)
               for t in stepped]
    assert got[:RESYNC_AFTER - 1] == [None] * (RESYNC_AFTER - 1)
    assert [g[0] for g in got[RESYNC_AFTER - 1:]] == stepped[RESYNC_AFTER - 1:]
    assert m.malformed == Counter({"bad_timestamp": RESYNC_AFTER - 1})
    # a second step soon after is followed as well, and logged at most once per 10 s
    again = [stepped[-1] - 3600 + i for i in range(RESYNC_AFTER)]
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        got = [d.decode(json.dumps({"ts": t, "values": [1, 2, 3]}).encode(), NOW)
               for t in again]
    assert got[-1][0] == again[-1]
    assert m.malformed == Counter({"bad_timestamp": 2 * (RESYNC_AFTER - 1)})
    steps = [r.getMessage() for r in caplog.records if "stepped back" in r.getMessage()]
    assert len(steps) == 1 and steps[0].startswith("test: device clock stepped back 3596.000 s")


class _Monotonic:
    """This machine's monotonic clock as the decoder reads it, moved by hand."""

    def __init__(self, monkeypatch):
        self.t = 1000.0
        monkeypatch.setattr("agent.decoders.monotonic", lambda: self.t)


def _stamped(d, ts, now=NOW, stream=None):
    """Each timestamp decoded as its own JSON sample: the times kept (None: refused)."""
    out = []
    for t in ts:
        got = d.decode_payload(json.dumps({"ts": t, "values": [1, 2, 3]}).encode(), now, stream)
        out.append(None if got is None else float(got[0][0]))
    return out


def test_a_timestamp_glitched_forward_costs_one_sample(monkeypatch, caplog):
    """One wrong digit two hours ahead (under FUTURE_TOLERANCE_S of this machine) neither
    moves the stream's clock nor costs the samples after it (the audit: five, and a
    learning period or shelve ended early downstream)."""
    _Monotonic(monkeypatch)
    d, m = make("json")
    ts = [T0 + i for i in range(10)]
    ts[4] += 7200
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        got = _stamped(d, ts)
    assert got == ts[:4] + [None] + ts[5:]
    assert m.malformed == Counter({"bad_timestamp": 1})
    assert not [r for r in caplog.records if "stepped" in r.getMessage()]


def test_a_real_clock_step_forward_is_followed(monkeypatch, caplog):
    _Monotonic(monkeypatch)
    d, m = make("json")
    stepped = [T0 + 3600 + i for i in range(RESYNC_AFTER + 2)]
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        got = _stamped(d, [T0 - 1, T0] + stepped)
    assert got[2:RESYNC_AFTER + 1] == [None] * (RESYNC_AFTER - 1)
    assert got[RESYNC_AFTER + 1:] == stepped[RESYNC_AFTER - 1:]
    assert m.malformed == Counter({"bad_timestamp": RESYNC_AFTER - 1})
    steps = [r.getMessage() for r in caplog.records if "stepped forward" in r.getMessage()]
    assert len(steps) == 1 and "3604.000 s" in steps[0]


def test_scattered_corrupted_times_behind_the_stream_are_not_followed(monkeypatch):
    """RESYNC_AFTER bad times in a row that do not agree with each other are noise, not a
    clock step: following the fifth cost the good samples after it (the session review)."""
    _Monotonic(monkeypatch)
    d, m = make("json")
    bad = [T0 - 1e5, T0 - 3e6, T0 - 7e5, T0 - 1e7, T0 - 5e6]
    good = [T0 + 1 + i for i in range(6)]
    assert _stamped(d, [T0 - 1, T0] + bad + good) == [T0 - 1, T0] + [None] * 5 + good
    assert m.malformed == Counter({"bad_timestamp": 5})


def test_a_gap_with_real_time_behind_it_is_no_step(monkeypatch):
    """A device switched off for two hours comes back two hours later: time that passed."""
    mono = _Monotonic(monkeypatch)
    d, m = make("json")
    assert _stamped(d, [T0, T0 + 1]) == [T0, T0 + 1]
    mono.t += 7200
    assert _stamped(d, [T0 + 7201, T0 + 7202]) == [T0 + 7201, T0 + 7202]
    assert not m.malformed


def test_replays_faster_than_real_time_and_logger_uploads_are_no_steps(monkeypatch):
    """A recording published at full speed (real time stands still here), and a logger
    that uploads an hour of 5-minute samples at once, every hour."""
    mono = _Monotonic(monkeypatch)
    d, m = make("json")
    fast = [T0 + i for i in range(300)]
    assert _stamped(d, fast, stream="replay") == fast
    start = T0 - 86400
    for hour in range(3):
        upload = [start + 3600 * hour + 300 * k for k in range(12)]
        assert _stamped(d, upload, stream="logger") == upload
        mono.t += 3600
    assert JUMP_S < 300 and not m.malformed


def test_a_machine_clock_days_behind_follows_the_device(monkeypatch, caplog):
    """A Raspberry Pi without a real-time clock or NTP boots on the time it was shut down
    (fake-hwclock): two days behind a device whose clock is right.  The device is
    followed after RESYNC_AFTER samples, not refused for as long as this machine is wrong,
    and the allowance goes once this machine's clock is put right."""
    _Monotonic(monkeypatch)
    d, m = make("json")
    late = NOW - 2 * 86400            # this machine's clock
    ts = [NOW + i for i in range(RESYNC_AFTER + 3)]
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        got = _stamped(d, ts, now=late)
    assert got[:RESYNC_AFTER - 1] == [None] * (RESYNC_AFTER - 1)
    assert got[RESYNC_AFTER - 1:] == ts[RESYNC_AFTER - 1:]
    assert m.malformed == Counter({"bad_timestamp": RESYNC_AFTER - 1})
    said = [r.getMessage() for r in caplog.records if "this machine's clock" in r.getMessage()]
    assert len(said) == 1 and "48.0 h behind the device's" in said[0]
    # NTP puts this machine right: a sample two days ahead of it is refused again
    right = ts[-1] + 1
    assert _stamped(d, [right], now=right) == [right]
    assert _stamped(d, [right + 2 * 86400], now=right + 1) == [None]


def test_clocks_are_per_stream_and_bounded():
    d, m = make("json")
    p = lambda t: json.dumps({"ts": t, "values": [1, 2, 3]}).encode()   # noqa: E731
    assert d.decode_payload(p(T0), NOW, "pump1") is not None
    assert d.decode_payload(p(T0 - 500), NOW, "pump2") is not None      # another device
    assert d.decode_payload(p(T0 - 500), NOW, "pump1") is None
    for i in range(MAX_TRACKED_STREAMS):                    # pump1 becomes the oldest: dropped
        d.decode_payload(p(T0), NOW, f"s{i}")
    assert d.decode_payload(p(T0 - 500), NOW, "pump1") is not None
    assert m.malformed == Counter({"bad_timestamp": 1})


# ---------------------------------------------------------------- JSON, examples
def test_json_values_list_and_dict():
    d, m = make("json")
    ts, v = d.decode(b'{"ts": 1699999990.5, "values": [1, 2, 3]}', NOW)
    assert ts == 1699999990.5
    np.testing.assert_array_equal(v, [1, 2, 3])
    ts, v = d.decode(b'{"values": {"c": 3, "a": 1, "b": 2}}', NOW)
    assert ts == NOW
    np.testing.assert_array_equal(v, [1, 2, 3])
    ts, v = d.decode(b'{"Timestamp": "2023-11-14 22:13:20", '
                     b'"values": {"a": 1, "zz": 9, "c": 3}}', NOW)
    assert ts == 1_700_000_000.0
    np.testing.assert_array_equal(v, np.array([1, np.nan, 3], np.float32))
    assert m.malformed == Counter({"missing_channel": 1, "unknown_channel": 1})
    ts, v = d.decode(b'{"values": [1, null, NaN]}', NOW)
    np.testing.assert_array_equal(v, np.array([1, np.nan, np.nan], np.float32))
    assert m.malformed["nan"] == 1
    # an absent channel is missing_channel; only a present bad value is "nan"
    m.malformed.clear()
    v = d.decode(b'{"values": {"a": 1, "c": 3}}', NOW)[1]
    np.testing.assert_array_equal(v, np.array([1, np.nan, 3], np.float32))
    assert m.malformed == Counter({"missing_channel": 1})
    v = d.decode(b'{"values": {"a": "inf", "c": 1e39}}', NOW)[1]
    assert np.isnan(v).all()
    assert m.malformed == Counter({"missing_channel": 2, "nan": 1})
    ts, v = d.decode(b'{"TS": 1700000000000000, "values": [1, "2.5", " 3 "]}', NOW)   # µs
    assert ts == 1_700_000_000.0
    np.testing.assert_array_equal(v, [1, 2.5, 3])


def test_json_flat_objects():
    d, m = make("json")
    # ESPHome / Node-RED style, the form agent/examples/agent.yaml documents
    ts, v = d.decode(b'{"a": 1.5, "b": 2, "c": "3", "timestamp": 1699999999}', NOW)
    assert ts == 1699999999.0
    np.testing.assert_array_equal(v, [1.5, 2, 3])
    ts, v = d.decode(b'{"c": 3, "a": 1, "b": null}', NOW)           # no time key: now
    assert ts == NOW
    np.testing.assert_array_equal(v, np.array([1, np.nan, 3], np.float32))
    assert m.malformed == Counter({"nan": 1})
    # Tasmota: "Time" (local ISO), sensors nested one level, text fields
    t, mt = make("json", channels=["ANALOG.A0", "ENERGY.Power", "ENERGY.Voltage"])
    tasmota = (b'{"Time": "2023-11-14T22:13:20", "ANALOG": {"A0": 512}, '
               b'"ENERGY": {"TotalStartTime": "2023-01-01T00:00:00", "Power": 42, '
               b'"Voltage": 230.5}, "TempUnit": "C"}')
    ts, v = t.decode(tasmota, NOW)
    assert ts == 1_700_000_000.0
    np.testing.assert_array_equal(v, [512, 42, 230.5])
    assert mt.malformed == Counter({"unknown_channel": 1})
    # a channel named like a nested object's key: the object's values are still read
    # (the whole sample was dropped as non_numeric), the channel itself is missing
    n, mn = make("json", channels=["ANALOG", "ANALOG.A0"])
    ts, v = n.decode(b'{"ANALOG": {"A0": 7}, "ts": 1700000000}', NOW)
    assert np.isnan(v[0]) and v[1] == 7
    assert mn.malformed == Counter({"missing_channel": 1})
    # a channel may itself be called "time"; then it is a value, not the timestamp
    tc, mc = make("json", channels=["time", "b"])
    ts, v = tc.decode(b'{"time": 7, "b": 8, "ts": 1699999999}', NOW)
    assert ts == 1699999999.0 and v.tolist() == [7, 8]
    assert sum(mc.malformed.values()) == 0


@pytest.mark.parametrize("line, reason", [
    (b'{"values": [1, 2]}', "field_count"),
    (b'{"values": {"zz": 1}}', "no_known_channel"),
    (b'{"ts": "soon", "values": [1, 2, 3]}', "bad_timestamp"),
    (b'{"ts": -1, "values": [1, 2, 3]}', "bad_timestamp"),
    (b'{"ts": 1e30, "values": [1, 2, 3]}', "bad_timestamp"),
    (b'{"ts": true, "values": [1, 2, 3]}', "bad_timestamp"),
    (b'{"time": 55840e10, "a": 1, "b": 2, "c": 3}', "bad_timestamp"),
    (b'{"ts": 1, "vals', "bad_json"),
    (b'[1, 2, 3]', "bad_json"),
    (b'{"ts": 1699999999}', "no_known_channel"),
    (b'"text"', "bad_json"),
    # deep nesting makes json raise RecursionError
    pytest.param(b"[" * 5000 + b"]" * 5000, "bad_json", id="deep_nesting"),
])
def test_json_unusable(line, reason):
    d, m = make("json")
    assert d.decode(line, NOW) is None
    assert m.malformed[reason] == 1
    assert fatal(m) == 1


@pytest.mark.parametrize("line, nan_at, named", [
    (b'{"values": [1, "x", 3]}', 1, 'b="x"'),
    (b'{"values": [1, true, 3]}', 1, "b=true"),
    (b'{"values": [1, "1_000", 3]}', 1, 'b="1_000"'),
    (b'{"values": [1, "\\u0661", 3]}', 1, 'b="\\u0661"'),
    (b'{"a": 1, "b": [2], "c": 3}', 1, "b=[2]"),
    (b'{"a": "high", "b": 2, "c": 3}', 0, 'a="high"'),
    (b'{"a": "Bad", "b": "unavailable", "c": 3}', None, 'a="Bad", b="unavailable"'),
])
def test_a_json_value_that_is_no_number_is_missing_in_its_channel_only(line, nan_at, named,
                                                                      caplog):
    """A gateway's quality text ("Bad"), true, a list: that channel is missing (NaN, which
    the ring forward-fills), the sample is kept, counted once as `non_numeric_value` and
    the channel named; one tag must not drop a wide sample's other values."""
    d, m = make("json")
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        ts, v = d.decode(line, NOW)
    want = [1.0, 2.0, 3.0]
    if nan_at is None:
        assert np.isnan(v[:2]).all() and v[2] == 3.0
    else:
        assert np.isnan(v[nan_at]) and all(v[i] == want[i] for i in range(3) if i != nan_at)
    assert m.malformed == Counter({"non_numeric_value": 1}) and fatal(m) == 0
    assert f"non_numeric_value ({named})" in caplog.text


def test_payloads():
    d, m = make("json")
    objs = [{"ts": T0 + i, "values": [i, i, i]} for i in range(3)]
    ts, v = d.decode_payload(json.dumps(objs).encode(), NOW)
    assert ts.tolist() == [T0, T0 + 1, T0 + 2] and ts.dtype == np.float64
    assert v.dtype == np.float32 and v.tolist() == [[0] * 3, [1] * 3, [2] * 3]
    lines = "\n".join(json.dumps(dict(o, ts=o["ts"] + 10)) for o in objs).encode() + b"\n"
    assert d.decode_payload(lines, NOW)[0].tolist() == [T0 + 10, T0 + 11, T0 + 12]
    pretty = json.dumps(dict(objs[1], ts=T0 + 20), indent=2).encode()
    assert d.decode_payload(pretty, NOW)[0].tolist() == [T0 + 20]
    flat = json.dumps([{"a": 1, "b": 2, "c": 3, "time": T0 + 21}]).encode()
    assert d.decode_payload(flat, NOW)[1].tolist() == [[1, 2, 3]]
    # one bad element does not cost the good ones
    good = [dict(o, ts=o["ts"] + 30) for o in objs]
    mixed = json.dumps([good[0], {"values": [1]}, 7, good[2]]).encode()
    assert d.decode_payload(mixed, NOW)[0].tolist() == [T0 + 30, T0 + 32]
    assert m.malformed == Counter({"field_count": 1, "bad_json": 1})
    assert d.decode_payload(b"", NOW) is None and m.malformed["empty"] == 1
    assert d.decode_payload(b"[7, 8]", NOW) is None and m.malformed["bad_json"] == 3
    c, mc = make("csv")
    got = c.decode_payload(f"{T0},1,2,3\r\n{T0 + 1},1,2,3\r\nbad\r\n{T0 + 2},1,2,3"
                           .encode(), NOW)
    assert got[0].tolist() == [T0, T0 + 1, T0 + 2] and got[1].shape == (3, 3)
    assert mc.malformed == Counter({"field_count": 1})


def test_decode_lines_is_decode_per_line():
    d, m = make()
    lines = [f"{T0 + i},{i},2,3".encode() for i in range(4)] + [b"junk", b"1,2"]
    ts, v = d.decode_lines(lines, NOW)
    assert ts.tolist() == [T0 + i for i in range(4)]
    assert v[:, 0].tolist() == [0, 1, 2, 3]
    assert m.malformed == Counter({"field_count": 2})
    assert d.decode_lines([b"junk"], NOW) is None


def test_logging_is_rate_limited(caplog):
    d, m = make()
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        for _ in range(50):
            d.decode(b"1,2", NOW)
            d.decode(b"\xff", NOW)
        d.decode_payload(b"1,2\n" * 100, NOW)
    assert m.malformed == Counter({"field_count": 150, "non_utf8": 50})
    assert len(caplog.records) == 2
    assert {r.getMessage().split(" in ")[0] for r in caplog.records} == \
        {"test: field_count (2 fields, expected 3 or 4)", "test: non_utf8"}


# ---------------------------------------------------------------- generated garbage
finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@st.composite
def csv_line(draw):
    """(line, kind, has an explicit missing value); "ts" lines carry a `{ts}` field that
    the test fills with increasing times (a backward one would be refused)."""
    vals = draw(st.lists(finite, min_size=3, max_size=3))
    fields = [repr(float(v)) for v in vals]
    kind = draw(st.sampled_from(["ok", "ts", "nan", "count", "text", "utf8", "empty", "long"]))
    sep = draw(st.sampled_from([",", ";"]))
    if kind == "ts":
        fields.insert(0, "{ts}")
    if kind == "nan":
        i = draw(st.integers(0, 2))
        fields[i] = draw(st.sampled_from(["nan", "NaN", "inf", "-inf", "", "null"]))
    if kind == "count":   # neither C nor C+1 fields
        fields = draw(st.sampled_from([fields[:1], fields[:2], fields + ["1", "2"]]))
    if kind == "text":
        fields[draw(st.integers(0, 2))] = draw(st.sampled_from(["abc", "1.2.3", "--", "0x1g",
                                                                "1_0", "\u0663"]))
    line = sep.join(fields).encode()
    if kind == "utf8":
        line += draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"]))
    if kind == "empty":
        line = draw(st.sampled_from([b"", b" ", b"\t\r"]))
    if kind == "long":
        line = line + b"0" * (MAX_LINE + 1)
    return line, kind, kind == "nan"


class AutoRule:
    """agent/csv_auto.py's rule written out again: what each generated line gives and
    counts under `timestamp: auto`."""

    def __init__(self) -> None:
        self.mode: bool | None = None
        self.held: list[tuple[bool, bool]] = []     # (has a timestamp, has a NaN)
        self.want: Counter = Counter()

    def samples_out(self, kind: str, has_nan: bool) -> int:
        shape = {"ok": False, "nan": False, "ts": True}.get(kind)
        if shape is None:
            self.want[{"text": "field_count" if self.mode else "non_numeric",
                       "count": "field_count", "utf8": "non_utf8", "empty": "empty",
                       "long": "too_long"}[kind]] += 1
            return 0
        if shape == self.mode:
            self.want["field_count"] += len(self.held)
            self.want["nan"] += has_nan
            self.held = []
            return 1
        self.held.append((shape, has_nan))
        run = len(list(takewhile(lambda h: h[0] == shape, reversed(self.held))))
        if run >= (DECIDE_AFTER if self.mode is None else REDECIDE_AFTER):
            out = [h for h in self.held if h[0] == shape]
            self.want["field_count"] += len(self.held) - len(out)
            self.want["nan"] += sum(h[1] for h in out)
            self.mode, self.held = shape, []
            return len(out)
        if len(self.held) > HOLD_MAX:
            self.held.pop(0)
            self.want["field_count"] += 1
        return 0


@settings(max_examples=200, deadline=None)
@given(st.lists(csv_line(), min_size=1, max_size=30))
def test_csv_generated_lines_are_counted_exactly(lines):
    d, m = make()
    rule = AutoRule()
    for k, (line, kind, has_nan) in enumerate(lines):
        line = line.replace(b"{ts}", f"{T0 + k * 0.01:.2f}".encode())
        out = check_line(d, m, line)
        assert (0 if out is None else len(out[0])) == rule.samples_out(kind, has_nan), line
        assert m.malformed == +rule.want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=20), st.sampled_from(["csv", "json"]),
       st.sampled_from(["auto", "first", "none"]))
def test_random_bytes_never_raise(blobs, protocol, timestamp):
    d, m = make(protocol, timestamp)
    for b in blobs:
        check_line(d, m, b)
        check_payload(d.decode_payload(b, NOW, "s"))


@settings(max_examples=150, deadline=None)
@given(st.lists(csv_line(), min_size=1, max_size=5), st.data())
def test_truncated_lines(lines, data):
    d, m = make()
    for k, (line, _, _) in enumerate(lines):
        line = line.replace(b"{ts}", f"{T0 + k}".encode())
        cut = data.draw(st.integers(0, len(line)))
        check_line(d, m, line[:cut])


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                        st.floats(1e9, 4e18), st.sampled_from(["1699999999", "2023-11-14"]))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)), max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["ts", "Time", "values", "x", "a", "b"]), json_value,
                       max_size=4),
       st.one_of(st.lists(json_value, max_size=4),
                 st.dictionaries(st.sampled_from(CH + ["zz"]), json_value, max_size=4)),
       st.booleans())
def test_json_generated_objects(obj, values, flat):
    d, m = make("json")
    obj = dict(obj, values=values) if "values" not in obj and not flat else obj
    line = json.dumps(obj).encode()
    before = fatal(m)
    check_result(d.decode(line, NOW), before, m)
    check_payload(d.decode_payload(line, NOW))
    check_payload(d.decode_payload(json.dumps([obj, obj]).encode(), NOW))
