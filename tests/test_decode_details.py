"""What a partial sample's log line says: the channels a keyed sample lacks
(missing_channel), as unknown_channel names its key."""
from __future__ import annotations

import logging
from collections import Counter

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
