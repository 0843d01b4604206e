"""A source's thread under the pipeline's runner: a live source that fails starts again,
a file source ends, and a stop ends either promptly.  Real pty, real replay file."""
from __future__ import annotations

import logging
import os
import time

import numpy as np

import agent.source_runner as source_runner
from agent.inbox import Inbox
from agent.metrics import Metrics
from agent.mqtt_client import MqttConfig
from agent.source_runner import SourceRunner
from agent.sources import build_source
from agent.sources.base import Batch
from test_sources import CH, T, open_pty, stream, wait_for


def drain(inbox: Inbox) -> list:
    out = []
    while (item := inbox.pop()) is not None:
        out.append(item)
    return out


def test_a_crashed_serial_source_starts_again_and_reads_on(monkeypatch, caplog):
    monkeypatch.setattr(source_runner, "RESTART_MIN_S", 0.05)
    master, slave, name = open_pty()
    m = Metrics()
    cfg = stream("s1", type="serial", port=name, baud=9600, timestamp="first")
    src = build_source(cfg, CH, m, MqttConfig(), "n")
    real = src.decoder.decode_lines
    calls = []

    def fails_once(lines, arrival):     # an unforeseen error in the source's own code
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("decoder bug")
        return real(lines, arrival)

    monkeypatch.setattr(src.decoder, "decode_lines", fails_once)
    inbox = Inbox(100)
    runner = SourceRunner(cfg, src, inbox, m)
    got: list = []
    try:
        with caplog.at_level(logging.WARNING, "tsad.pipeline"):
            runner.start()
            wait_for(lambda: src.connected, what="serial open")
            os.write(master, f"{T + 1},1,2,3\n".encode())
            wait_for(lambda: m.malformed["source_crash"] == 1, what="the crash")
            wait_for(lambda: src.connected, what="serial open again")
            os.write(master, f"{T + 2},4,5,6\n".encode())
            wait_for(lambda: got.extend(drain(inbox)) or got, what="a sample after the restart")
        assert runner.running
        assert [type(x) for x in got] == [Batch]
        np.testing.assert_array_equal(got[0].values, [[4, 5, 6]])
        assert "s1: source SerialLineSource crashed" in caplog.text
        assert "s1: source restarts in 0.05 s" in caplog.text
    finally:
        runner.stop()
        runner.join(5)
        os.close(master)
        os.close(slave)
    assert not runner.running
    assert drain(inbox)[-1] is runner           # the end marker, once stopped


def test_a_crashed_file_source_ends_instead_of_repeating_its_rows(tmp_path, monkeypatch):
    p = tmp_path / "r.csv"
    p.write_text("timestamp,a,b,c\n0,1,1,1\n1,2,2,2\n")
    m = Metrics()
    cfg = stream("r", type="replay", path=str(p))
    src = build_source(cfg, CH, m, MqttConfig(), "n")
    starts = []

    def crash(emit, stop):
        starts.append(1)
        raise RuntimeError("bug")

    monkeypatch.setattr(src, "run", crash)
    inbox = Inbox(100)
    runner = SourceRunner(cfg, src, inbox, m)
    runner.start()
    runner.join(5)
    assert not runner.running
    assert starts == [1] and m.malformed["source_crash"] == 1
    assert drain(inbox) == [runner]


def always_failing(monkeypatch) -> tuple[SourceRunner, Metrics]:
    """A runner of a live (serial) source whose run fails at once, every time."""
    m = Metrics()
    cfg = stream("s1", type="serial", port="/dev/null-none", baud=9600)
    src = build_source(cfg, CH, m, MqttConfig(), "n")
    monkeypatch.setattr(src, "run", lambda emit, stop: 1 / 0)
    return SourceRunner(cfg, src, Inbox(10), m), m


def test_a_stop_ends_the_wait_before_a_restart(monkeypatch):
    monkeypatch.setattr(source_runner, "RESTART_MIN_S", 3600.0)
    runner, m = always_failing(monkeypatch)
    runner.start()
    wait_for(lambda: m.malformed["source_crash"] == 1, what="the crash")
    began = time.monotonic()
    runner.stop()
    runner.join(5)
    assert not runner.running and time.monotonic() - began < 5


def test_the_wait_doubles_while_a_source_keeps_failing(monkeypatch, caplog):
    monkeypatch.setattr(source_runner, "RESTART_MIN_S", 0.01)
    monkeypatch.setattr(source_runner, "RESTART_MAX_S", 0.04)
    runner, m = always_failing(monkeypatch)
    with caplog.at_level(logging.WARNING, "tsad.pipeline"):
        runner.start()
        wait_for(lambda: m.malformed["source_crash"] >= 5, what="five crashes")
        runner.stop()
        runner.join(5)
    waits = [r.getMessage().rsplit(" ", 2)[1] for r in caplog.records
             if "restarts in" in r.getMessage()]
    assert waits[:4] == ["0.01", "0.02", "0.04", "0.04"]
