"""Unusable input in the log (agent/bad_input.py): every one counted, a reason that keeps
coming reported less and less often, one that comes back after a quiet spell at once."""
from __future__ import annotations

import logging

import pytest

from agent import bad_input
from agent.bad_input import LOG_INTERVAL_S, MAX_LOG_INTERVAL_S, BadInput
from agent.decoders import LineDecoder
from agent.metrics import Metrics


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(bad_input.time, "monotonic", c)
    return c


def reports(caplog) -> int:
    return sum("field_count" in r.getMessage() for r in caplog.records)


def test_a_reason_that_never_stops_is_reported_less_and_less_often(clock, caplog):
    b = BadInput(Metrics(), "mqtt:pump")
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        for _ in range(86_400 * 10):          # a day at 10 Hz
            b.bad("field_count", b"1,2")
            clock.t += 0.1
    assert b.metrics.malformed["field_count"] == 864_000       # every one counted
    # 10 s, 20 s, ... doubling to the hourly cap: about 33 lines a day, not 8,640
    assert reports(caplog) < 40
    assert b._interval["field_count"] == MAX_LOG_INTERVAL_S
    caplog.clear()
    clock.t += 3 * MAX_LOG_INTERVAL_S                            # a quiet spell
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        b.bad("field_count", b"1,2")
    assert reports(caplog) == 1 and b._interval["field_count"] == LOG_INTERVAL_S


@pytest.mark.parametrize("every_s", [21, 60, 300])
def test_a_quirk_every_minute_backs_off_too(clock, caplog, every_s):
    """A device status message on the data topic every 21 s, minute or 5 minutes: before,
    "going on" meant within twice the interval (20 s at first), so each one was news
    (4,115, 1,440 and 288 lines a day).  Now it backs off to hourly as a constant one does."""
    b = BadInput(Metrics(), "mqtt:pump")
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        for _ in range(86_400 // every_s):
            b.bad("field_count", b"{status}")
            clock.t += every_s
    assert b.metrics.malformed["field_count"] == 86_400 // every_s
    assert reports(caplog) <= 40
    assert b._interval["field_count"] == MAX_LOG_INTERVAL_S


def test_an_unknown_key_is_named(clock, caplog):
    d = LineDecoder(["a", "b"], "json", "auto", Metrics(), "mqtt:pump")
    with caplog.at_level(logging.WARNING, logger="tsad.decode"):
        for i in range(3):      # `auto` decides the time's form on the third line
            d.decode(b'{"a": 1, "b": 2, "x1": 0, "x2": 0, "x3": 0, "TempUnit": "C", '
                     b'"ts": %d}' % (1_700_000_000 + i), 1_700_000_000.0 + i)
    assert "unknown_channel (key 'x1')" in caplog.text
