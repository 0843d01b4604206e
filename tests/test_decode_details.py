"""What a refused or partial sample's log line says: the channels a keyed sample lacks
(missing_channel), and how `timestamp: auto` read a CSV line whose field count fits the
other shape (a device one channel short or over), so the log points at the channel count
instead of a number or date format."""
from __future__ import annotations

import logging
from collections import Counter

import pytest

from agent.decoders import LineDecoder
from agent.metrics import Metrics

CH = ["TT101_bearing_temp_C", "PT102_discharge_bar", "VT103_vibration_mm_s",
      "FT104_flow_m3h", "ZV105_valve_pct"]
T0 = 1.7e9


def said(caplog, reason: str) -> list[str]:
    """The detail of each logged `reason` line (the text in parentheses after it)."""
    out = []
    for r in caplog.records:
        msg = r.getMessage().split(": ", 1)[1]
        if msg.startswith(reason):
            head = msg.split(" in b'", 1)[0]
            out.append(head[len(reason) + 2:-1] if head != reason else "")
    return out


def decoder(protocol: str = "csv", timestamp: str = "auto") -> tuple[LineDecoder, Metrics]:
    m = Metrics()
    return LineDecoder(CH, protocol, timestamp, m, "test"), m


def test_missing_channel_names_the_absent_channel(caplog):
    d, m = decoder("json")
    sample = {"ts": T0, **{c: 1.0 for c in CH if c != "FT104_flow_m3h"}}
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        got = d.decode(repr(sample).replace("'", '"').encode(), T0)
    assert got is not None and m.malformed == Counter({"missing_channel": 1})
    assert said(caplog, "missing_channel") == ["FT104_flow_m3h"]


def test_missing_channels_beyond_three_are_counted_not_listed(caplog):
    d, _ = decoder("json")
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        d.decode_payload(b'{"values": {"ZV105_valve_pct": 1.0}}', T0)
    assert said(caplog, "missing_channel") == [
        "TT101_bearing_temp_C, PT102_discharge_bar, VT103_vibration_mm_s +1 more"]


@pytest.mark.parametrize("line, reason, detail", [
    # a timestamp and one value too few: C fields, read as C values
    (b"2024-05-10 08:00:00.000,54.3466,7.1,2.2,40.0", "non_numeric",
     "TT101_bearing_temp_C='2024-05-10 08:00:00.000'; timestamp auto, by the field count: "
     "5 fields read as 5 values without a timestamp; the model has 5 channels"),
    # one value too many and no timestamp: C + 1 fields, the first read as a time
    (b"54.3466,7.1,2.2,31.0,40.0,9.9", "bad_timestamp",
     "timestamp out of range: 54.3466; timestamp auto, by the field count: 6 fields read as "
     "a timestamp and 5 values; the model has 5 channels"),
])
def test_auto_says_how_a_line_of_the_other_shape_was_read(caplog, line, reason, detail):
    d, m = decoder()
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        for i in range(5):
            assert d.decode(line, T0 + i) is None
    assert m.malformed == Counter({reason: 5})
    assert said(caplog, reason) == [detail]


def test_a_decided_stream_says_it_read_by_its_decision(caplog):
    d, _ = decoder()
    for i in range(4):
        d.decode(b"54.3,7.1,2.2,31.0,40.0", T0 + i)
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        assert d.decode(b"2024-05-10 08:00:00.000,54.3,7.1,2.2,31.0", T0 + 5) is None
    assert said(caplog, "non_numeric") == [
        "TT101_bearing_temp_C='2024-05-10 08:00:00.000'; timestamp auto, by the stream's "
        "decision: 5 fields read as 5 values without a timestamp; the model has 5 channels"]


@pytest.mark.parametrize("timestamp, line, reason, detail", [
    # the configured shape is the user's own word: nothing to explain but the field
    ("none", b"2024-05-10 08:00:00.000,54.3466,7.1,2.2,40.0", "non_numeric",
     "TT101_bearing_temp_C='2024-05-10 08:00:00.000'"),
    ("none", b"54.3466,7.1,Bad,31.0,40.0", "non_numeric", "VT103_vibration_mm_s='Bad'"),
    ("first", b"54.3466,7.1,2.2,31.0,40.0,9.9", "bad_timestamp",
     "timestamp out of range: 54.3466"),
])
def test_a_configured_shape_keeps_the_plain_detail(caplog, timestamp, line, reason, detail):
    d, _ = decoder(timestamp=timestamp)
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        d.decode(line, T0)
    assert said(caplog, reason) == [detail]


def test_a_timestamp_the_clock_refuses_is_not_blamed_on_the_shape(caplog):
    auto, _ = decoder()
    for i in range(4):
        auto.decode(f"{T0 + 100 + i},1,2,3,4,5".encode(), T0 + 100 + i)
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        auto.decode(f"{T0},1,2,3,4,5".encode(), T0 + 104)       # 100 s behind its stream
    assert said(caplog, "bad_timestamp") == ["103.000 s behind the stream"]


@pytest.mark.parametrize("first, warned", [(T0, True), (T0 * 1000, True), (54.3, False)])
def test_an_epoch_time_read_as_the_first_value_is_warned_about(caplog, first, warned):
    """A timestamp and one value too few under `timestamp: auto` are C fields: read as C
    values with an epoch number, nothing is refused (the docs audit found it silent), so
    the decision on the plain shape says that the first field reads as a time."""
    d = LineDecoder(CH, "csv", "auto", Metrics(), "pump")
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        for i in range(6):
            got = d.decode(f"{first + i:.10g},1,2,3,4".encode(), T0 + i)
    assert got is not None and float(got[1][0]) == pytest.approx(first + 5, rel=1e-6)
    lines = [r.getMessage() for r in caplog.records if "reads as a time" in r.getMessage()]
    assert len(lines) == (1 if warned else 0)
    if warned:
        assert "one value too few" in lines[0] and "5 channels" in lines[0]
