"""Agent-level robustness: the real agent process, a real pty as its serial port,
real mosquitto that the tests stop and start, and a persistent-session subscriber.
Each test asserts the exact set of alert ids received (duplicates allowed, counted).
"""
from __future__ import annotations

import os
import time

import pytest

from agent_harness import (MOSQUITTO, STREAM, AgentProcess, LineWriter, Pty, Rig, alert_id,
                           assert_exact, index_of, no_traceback, outbox_ids, wait_until)

pytestmark = pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="mosquitto not installed")


@pytest.fixture
def rig(tmp_path):
    # no wait for `online` in agent(): some tests start the agent with the broker down
    r = Rig(tmp_path, wait_online=False)
    yield r
    r.close()


def _opened(agent: AgentProcess, n: int = 1) -> None:
    # The port flushes its input when opened: write only once the agent has it open.
    agent.wait_log("open at", n)


def test_broker_outage_while_anomalies_stream(rig):
    agent = rig.agent()
    _opened(agent)
    wait_until(lambda: b"online" in rig.obs.availability(), "agent online")
    w = rig.writer
    w.normal(20)
    expected = set(w.spikes(3))
    rig.obs.wait_ids(expected)

    rig.broker.stop()
    during = w.spikes(5, pause=0.05)
    expected |= set(during)
    # the agent read them while the broker was away: they wait in its outbox
    wait_until(lambda: set(during) <= outbox_ids(rig.state), "outage alerts in the outbox")
    rig.broker.start()
    expected |= set(w.spikes(3))
    rig.obs.wait_ids(expected, timeout=45)
    stats = assert_exact(rig.obs, expected)
    print(f"broker outage: {stats}")
    wait_until(lambda: not outbox_ids(rig.state), "the outbox to empty")
    assert agent.running()
    no_traceback(agent)


def test_agent_killed_during_outage_delivers_after_restart(rig):
    agent = rig.agent()
    _opened(agent)
    wait_until(lambda: b"online" in rig.obs.availability(), "agent online")
    w = rig.writer
    w.normal(20)
    expected = set(w.spikes(2))
    rig.obs.wait_ids(expected)

    rig.broker.stop()
    queued = set(w.spikes(4))
    expected |= queued
    wait_until(lambda: queued <= outbox_ids(rig.state), "alerts in the outbox")
    agent.kill()                          # SIGKILL: no clean shutdown of anything

    again = rig.agent()
    _opened(again)
    w.normal(20)                          # the restarted agent's window refills
    after = set(w.spikes(2))
    expected |= after
    wait_until(lambda: queued | after <= outbox_ids(rig.state), "old and new alerts in the outbox")
    rig.broker.start()
    rig.obs.wait_ids(expected, timeout=45)
    print(f"SIGKILL during outage: {assert_exact(rig.obs, expected)}")
    assert again.running()
    no_traceback(again)


def test_broker_absent_at_start(rig):
    rig.broker.stop()                     # the observer's session stays in the broker
    agent = rig.agent()
    _opened(agent)
    w = rig.writer
    w.normal(20)
    expected = set(w.spikes(4))
    wait_until(lambda: expected <= outbox_ids(rig.state), "alerts buffered in the outbox")
    agent.wait_log("unreachable")
    assert agent.running()
    rig.broker.start()
    expected |= set(w.spikes(2))
    rig.obs.wait_ids(expected, timeout=45)
    print(f"broker absent at start: {assert_exact(rig.obs, expected)}")
    assert b"online" in rig.obs.availability()
    no_traceback(agent)


def _connected(h: dict) -> bool:
    return h["sources"][STREAM]["connected"]


def test_serial_unplug_replug(tmp_path):
    link = tmp_path / "ttyUSB0"
    first = Pty()
    link.symlink_to(first.path)
    r = Rig(tmp_path, serial_port=str(link), wait_online=False)
    r.pty.close()
    r.pty = first
    r.writer = w = LineWriter(first)
    try:
        agent = r.agent()
        _opened(agent)
        w.normal(20)
        expected = set(w.spikes(3))
        r.obs.wait_ids(expected)
        wait_until(lambda: any(_connected(h) for _, h in r.obs.healths()), "health: connected")

        # unplug: the device node goes away (a pty's slave vanishes once both ends close)
        unplugged = time.monotonic()
        first.close()
        agent.wait_log("lost")
        wait_until(lambda: any(at > unplugged and not _connected(h)
                               for at, h in r.obs.healths()), "health: connected false")
        time.sleep(1.5)
        assert all(not _connected(h) for at, h in r.obs.healths()[-3:]), \
            "health must keep saying disconnected while unplugged"

        # replug under the same name (udev re-creating /dev/serial/by-id/...)
        second = Pty()
        tmp_link = tmp_path / "ttyUSB0.new"
        tmp_link.symlink_to(second.path)
        os.replace(tmp_link, link)
        replugged = time.monotonic()
        r.pty, w.pty = second, second
        # Lines written before the agent reopens are flushed by the open, so stream
        # anomalies continuously: the first alert's start names the first line it read.
        mark_from = w.i
        end = time.monotonic() + 20
        while not any(index_of(i) >= mark_from for i in r.obs.ids("new")):
            assert time.monotonic() < end, "no alert within 20 s of the replug"
            w.line(True)
            time.sleep(0.01)
        first_read = min(index_of(i) for i in r.obs.ids("new") if index_of(i) >= mark_from)
        resume_s = w.written_at[first_read] - replugged
        w.normal(10)          # closes the marker alert
        expected.add(alert_id(first_read))
        expected |= set(w.spikes(3))
        r.obs.wait_ids(expected)
        print(f"serial replug: first sample read {resume_s:.2f} s after replug; "
              f"{assert_exact(r.obs, expected)}")
        wait_until(lambda: _connected(r.obs.healths()[-1][1]), "health: connected again")
        assert resume_s < 2.0, f"stream resumed only {resume_s:.2f} s after replug"
        assert agent.running()
        no_traceback(agent)
    finally:
        r.close()
