"""LineDecoder: every input is either a sample or exactly one counted reason; it never raises."""
from __future__ import annotations

import json
import logging
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from agent.decoders import FATAL_REASONS, MAX_LINE, LineDecoder
from agent.metrics import Metrics

CH = ["a", "b", "c"]
NOW = 1_700_000_000.0


def make(protocol="csv", timestamp="auto", channels=CH):
    m = Metrics()
    return LineDecoder(channels, protocol, timestamp, m, "test"), m


def fatal(m: Metrics) -> int:
    return sum(v for k, v in m.malformed.items() if k in FATAL_REASONS)


def check_result(res, before: int, m: Metrics, c: int = len(CH)):
    """A None result adds exactly one fatal reason; a sample adds none and is well formed."""
    if res is None:
        assert fatal(m) == before + 1
    else:
        assert fatal(m) == before
        ts, v = res
        assert isinstance(ts, float) and math.isfinite(ts)
        assert v.dtype == np.float32 and v.shape == (c,)
        assert not np.isinf(v).any()


# ---------------------------------------------------------------- CSV, examples
@pytest.mark.parametrize("line, ts, values", [
    (b"1,2,3", NOW, [1, 2, 3]),
    (b" 1.5 ; -2e3 ; 3 \r", NOW, [1.5, -2000, 3]),
    (b"1583764481,1,2,3", 1583764481.0, [1, 2, 3]),
    (b"1583764481500,1,2,3", 1583764481.5, [1, 2, 3]),          # epoch milliseconds
    (b"2020-03-09 14:34:41;1;2;3", 1583764481.0, [1, 2, 3]),    # SKAB style, naive = UTC
    (b"2020-03-09T16:34:41+02:00,1,2,3", 1583764481.0, [1, 2, 3]),
    (b"2020-03-09T14:34:41Z,1,2,3", 1583764481.0, [1, 2, 3]),
])
def test_csv_valid(line, ts, values):
    d, m = make()
    got = d.decode(line, NOW)
    assert got is not None
    assert got[0] == pytest.approx(ts)
    np.testing.assert_array_equal(got[1], np.array(values, np.float32))
    assert sum(m.malformed.values()) == 0


@pytest.mark.parametrize("line, reason", [
    (b"", "empty"),
    (b"  \r", "empty"),
    (b"1,2", "field_count"),
    (b"1,2,3,4,5", "field_count"),
    (b"1,x,3", "non_numeric"),
    (b"1,2,3\xff", "non_utf8"),
    (b"yesterday,1,2,3", "bad_timestamp"),
    (b"nan,1,2,3", "bad_timestamp"),
    pytest.param(b"1," * (MAX_LINE // 2) + b"1", "too_long", id="too_long"),
    (b"Accelerometer;Current;Pressure", "non_numeric"),   # a header line
])
def test_csv_unusable(line, reason):
    d, m = make()
    assert d.decode(line, NOW) is None
    assert m.malformed == Counter({reason: 1})


def test_csv_missing_values_keep_the_sample():
    d, m = make()
    for line in (b"1,nan,3", b"1,,3", b"1,inf,3", b"1,NULL,3", b"1,1e300,3"):
        got = d.decode(line, NOW)
        assert got is not None, line
        np.testing.assert_array_equal(got[1], np.array([1, np.nan, 3], np.float32))
    assert m.malformed == Counter({"nan": 5})


def test_csv_timestamp_modes():
    d, m = make(timestamp="first")
    assert d.decode(b"1,2,3", NOW) is None                  # no room for a timestamp
    assert d.decode(b"10,1,2,3", NOW)[0] == 10.0
    d2, m2 = make(timestamp="none")
    assert d2.decode(b"10,1,2,3", NOW) is None
    assert d2.decode(b"1,2,3", NOW)[0] == NOW
    assert m.malformed == m2.malformed == Counter({"field_count": 1})


# ---------------------------------------------------------------- JSON, examples
def test_json_values_list_and_dict():
    d, m = make("json")
    ts, v = d.decode(b'{"ts": 100.5, "values": [1, 2, 3]}', NOW)
    assert ts == 100.5
    np.testing.assert_array_equal(v, [1, 2, 3])
    ts, v = d.decode(b'{"values": {"c": 3, "a": 1, "b": 2}}', NOW)
    assert ts == NOW
    np.testing.assert_array_equal(v, [1, 2, 3])
    ts, v = d.decode(b'{"ts": "2020-03-09 14:34:41", "values": {"a": 1, "zz": 9, "c": 3}}', NOW)
    assert ts == 1583764481.0
    np.testing.assert_array_equal(v, np.array([1, np.nan, 3], np.float32))
    assert m.malformed == Counter({"missing_channel": 1, "unknown_channel": 1})
    ts, v = d.decode(b'{"values": [1, null, NaN]}', NOW)
    np.testing.assert_array_equal(v, np.array([1, np.nan, np.nan], np.float32))
    assert m.malformed["nan"] == 1


@pytest.mark.parametrize("line, reason", [
    (b'{"values": [1, 2]}', "field_count"),
    (b'{"values": [1, "x", 3]}', "non_numeric"),
    (b'{"values": [1, true, 3]}', "non_numeric"),
    (b'{"values": {"zz": 1}}', "no_known_channel"),
    (b'{"ts": "soon", "values": [1, 2, 3]}', "bad_timestamp"),
    (b'{"ts": 1, "vals', "bad_json"),
    (b'[1, 2, 3]', "bad_json"),
    (b'{"ts": 1}', "bad_json"),
    # deep nesting makes json raise RecursionError
    pytest.param(b"[" * 5000 + b"]" * 5000, "bad_json", id="deep_nesting"),
])
def test_json_unusable(line, reason):
    d, m = make("json")
    assert d.decode(line, NOW) is None
    assert m.malformed[reason] == 1
    assert fatal(m) == 1


def test_payloads():
    d, m = make("json")
    objs = [{"ts": i, "values": [i, i, i]} for i in range(3)]
    assert [s[0] for s in d.decode_payload(json.dumps(objs).encode(), NOW)] == [0, 1, 2]
    assert [s[0] for s in d.decode_payload(
        "\n".join(json.dumps(o) for o in objs).encode() + b"\n", NOW)] == [0, 1, 2]
    pretty = json.dumps(objs[1], indent=2).encode()
    assert [s[0] for s in d.decode_payload(pretty, NOW)] == [1]
    # one bad element does not cost the good ones
    mixed = json.dumps([objs[0], {"values": [1]}, 7, objs[2]]).encode()
    assert [s[0] for s in d.decode_payload(mixed, NOW)] == [0, 2]
    assert m.malformed == Counter({"field_count": 1, "bad_json": 1})
    assert d.decode_payload(b"", NOW) == [] and m.malformed["empty"] == 1
    c, mc = make("csv")
    assert [s[0] for s in c.decode_payload(b"1,1,2,3\r\n2,1,2,3\r\nbad\r\n", NOW)] == [1, 2]
    assert mc.malformed == Counter({"field_count": 1})


def test_logging_is_rate_limited(caplog):
    d, m = make()
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        for _ in range(50):
            d.decode(b"1,2", NOW)
            d.decode(b"\xff", NOW)
    assert m.malformed == Counter({"field_count": 50, "non_utf8": 50})
    assert len(caplog.records) == 2
    assert {r.getMessage().split(" in ")[0] for r in caplog.records} == \
        {"test: field_count", "test: non_utf8"}


# ---------------------------------------------------------------- generated garbage
finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@st.composite
def csv_line(draw):
    """(line, expected reason or None, number of explicit missing values)"""
    vals = draw(st.lists(finite, min_size=3, max_size=3))
    fields = [repr(float(v)) for v in vals]
    kind = draw(st.sampled_from(["ok", "ts", "nan", "count", "text", "utf8", "empty", "long"]))
    sep = draw(st.sampled_from([",", ";"]))
    if kind == "ts":
        fields.insert(0, str(draw(st.integers(0, 2_000_000_000))))
    if kind == "nan":
        i = draw(st.integers(0, 2))
        fields[i] = draw(st.sampled_from(["nan", "NaN", "inf", "-inf", "", "null"]))
    if kind == "count":   # neither C nor C+1 fields
        fields = draw(st.sampled_from([fields[:1], fields[:2], fields + ["1", "2"]]))
    if kind == "text":
        fields[draw(st.integers(0, 2))] = draw(st.sampled_from(["abc", "1.2.3", "--", "0x1g"]))
    line = sep.join(fields).encode()
    if kind == "utf8":
        line += draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"]))
    if kind == "empty":
        line = draw(st.sampled_from([b"", b" ", b"\t\r"]))
    if kind == "long":
        line = line + b"0" * (MAX_LINE + 1)
    expected = {"ok": None, "ts": None, "nan": None, "count": "field_count", "text": "non_numeric",
                "utf8": "non_utf8", "empty": "empty", "long": "too_long"}[kind]
    return line, expected, kind == "nan"


@settings(max_examples=200, deadline=None)
@given(st.lists(csv_line(), min_size=1, max_size=30))
def test_csv_generated_lines_are_counted_exactly(lines):
    d, m = make()
    want = Counter()
    for line, reason, has_nan in lines:
        before = fatal(m)
        res = d.decode(line, NOW)
        check_result(res, before, m)
        if reason is None:
            assert res is not None, line
        else:
            want[reason] += 1
        if has_nan:
            want["nan"] += 1
    assert m.malformed == want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=20), st.sampled_from(["csv", "json"]),
       st.sampled_from(["auto", "first", "none"]))
def test_random_bytes_never_raise(blobs, protocol, timestamp):
    d, m = make(protocol, timestamp)
    for b in blobs:
        before = fatal(m)
        check_result(d.decode(b, NOW), before, m)
        out = d.decode_payload(b, NOW)
        assert all(v.shape == (3,) for _, v in out)


@settings(max_examples=150, deadline=None)
@given(st.lists(csv_line(), min_size=1, max_size=5), st.data())
def test_truncated_lines(lines, data):
    d, m = make()
    for line, _, _ in lines:
        cut = data.draw(st.integers(0, len(line)))
        before = fatal(m)
        check_result(d.decode(line[:cut], NOW), before, m)


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)), max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["ts", "values", "x"]), json_value, max_size=3),
       st.one_of(st.lists(json_value, max_size=4),
                 st.dictionaries(st.sampled_from(CH + ["zz"]), json_value, max_size=4)))
def test_json_generated_objects(obj, values):
    d, m = make("json")
    obj = dict(obj, values=values) if "values" not in obj else obj
    line = json.dumps(obj).encode()
    before = fatal(m)
    check_result(d.decode(line, NOW), before, m)
    d.decode_payload(line, NOW)
    d.decode_payload(json.dumps([obj, obj]).encode(), NOW)
