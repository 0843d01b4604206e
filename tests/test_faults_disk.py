"""The real agent process against a broken state_dir: a full disk, a damaged outbox
file, and kill -9 with an alert open.  Real mosquitto, a real pty as the serial
port, a persistent-session subscriber; each test asserts the exact set of alert
ids received (duplicates allowed, counted) and that nothing was lost.
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from pathlib import Path

import pytest

import agent_harness
from agent_harness import (MOSQUITTO, alert_id, assert_exact, no_traceback, sample_ts,
                           wait_until)
from test_outbox import KeepFull, scribble, tiny_fs

from agent.timestamps import iso_utc
from agent.outbox import Outbox
from agent.sinks.mqtt import PERSIST_S

pytestmark = pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="mosquitto not installed")


class Rig(agent_harness.Rig):
    def outbox_health(self) -> dict | None:
        h = self.outbox_healths()
        return h[-1] if h else None

    def outbox_healths(self, since: int = 0) -> list[dict]:
        return [h["mqtt"]["outbox"] for _, h in self.obs.healths()[since:]]


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path, tmp_path / "state")
    yield r
    r.close()


def test_full_disk_while_the_broker_is_up(tmp_path):
    with tiny_fs(tmp_path / "fs") as fs:
        r = Rig(tmp_path, fs / "state")
        filler = None
        try:
            agent = r.agent()
            w = r.writer
            w.normal(20)
            # the case: SQLite's default WAL (checkpoint at 4 MB, never truncated)
            # filled a 256 KB state_dir by itself after a dozen alerts
            expected = set(w.spikes(20))
            r.obs.wait_ids(expected)
            wait_until(lambda: r.outbox_health() is not None, "a health message")
            assert r.outbox_health()["ok"] is True and agent.count("cannot be written") == 0

            seen = len(r.obs.healths())
            filler = KeepFull(fs)         # a one-off fill can be undone by the outbox
            during = set(w.spikes(12, pause=0.05))
            expected |= during
            r.obs.wait_ids(expected)
            # any report since the fill: a retry can still win a freed page from the
            # filler for a moment, so the newest report may say ok
            bad = wait_until(lambda: next((h for h in r.outbox_healths(seen)
                                           if h["ok"] is False), None),
                             "health: outbox failing")
            assert "full" in bad["error"] and bad["lost"] == 0, bad
            agent.wait_log("kept in memory")

            filler.close()                # space again: the outbox recovers by itself
            wait_until(lambda: r.outbox_health()["ok"] is True, "health: outbox ok again")
            expected |= set(w.spikes(3))
            r.obs.wait_ids(expected)
            stats = assert_exact(r.obs, expected)
            print(f"full disk, broker up: {len(during)} alerts raised while full; {stats}")
            # the last alerts reach the observer before the broker's acks reach the outbox,
            # so a health report of that moment can still count them: wait for one after
            drained = {"ok": True, "error": None, "depth": 0, "memory": 0, "lost": 0}
            wait_until(lambda: r.outbox_health() == drained, f"health: outbox {drained}")
            assert agent.running() and agent.count("not stored") == 0
            no_traceback(agent)
        finally:
            if filler is not None:
                filler.close()
            r.close()


def _old_queue(state: Path, n: int) -> list[str]:
    """An outbox a previous run left with n undelivered "update" events (their ids
    are not alert ids the test's spikes can produce)."""
    ob = Outbox(state / "outbox.sqlite")
    ids = [f"old:{i}" for i in range(n)]
    for i in ids:
        ob.put("tsad/rb/alerts", json.dumps({"type": "update", "id": i, "pad": "x" * 300})
               .encode(), "update")
    ob.close()
    return ids


@pytest.mark.parametrize("damage", ["pages", "truncated"])
def test_damaged_outbox_is_salvaged_and_delivery_goes_on(rig, damage):
    old = _old_queue(rig.state, 300)
    path = rig.state / "outbox.sqlite"
    if damage == "pages":
        scribble(path, range(20, 30))
    else:
        os.truncate(path, 4096)
    agent = rig.agent()
    agent.wait_log("is damaged")
    m = re.search(r"saved (\d+) rows, lost (\d+)", agent.log())
    assert m, agent.log()
    saved, lost = int(m[1]), int(m[2])
    assert saved + lost == len(old) and lost > 0
    if damage == "truncated":
        assert saved == 0
    w = rig.writer
    w.normal(20)
    expected = set(w.spikes(5))
    rig.obs.wait_ids(expected)
    wait_until(lambda: len({a["id"] for a in rig.obs.alerts() if a["type"] == "update"})
               >= saved, f"the {saved} saved events")
    got_old = {a["id"] for a in rig.obs.alerts() if a["type"] == "update"}
    assert len(got_old) == saved and got_old <= set(old)
    stats = assert_exact(rig.obs, expected)
    print(f"damaged outbox ({damage}): {saved} saved, {lost} lost and counted; after start: "
          f"{stats}")
    wait_until(lambda: (rig.outbox_health() or {}).get("lost") == lost, "health: lost count")
    assert len(list(rig.state.glob("outbox.sqlite.corrupt-*"))) == 1
    assert agent.running() and agent.count("sender failed") == 0
    no_traceback(agent)


def _persisted(state: Path) -> list[tuple[str, float]]:
    db = sqlite3.connect(f"file:{state / 'outbox.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute("SELECT id, last_ts FROM open_alerts").fetchall()
    finally:
        db.close()


def test_kill_9_with_an_alert_open_ends_it_at_restart(rig):
    agent = rig.agent()
    w = rig.writer
    w.normal(20)
    expected = set(w.spikes(2))
    rig.obs.wait_ids(expected)
    first = w.i
    open_id = alert_id(w.line(True))
    for _ in range(30):                  # keeps it open while its samples advance
        w.line(True)
        time.sleep(0.02)
    last = w.i - 1
    wait_until(lambda: open_id in rig.obs.ids("new"), "the alert to open")
    # stored at most every PERSIST_S: wait for it rather than guess the interval
    wait_until(lambda: _persisted(rig.state) == [(open_id, sample_ts(last))],
               "the last sample time stored", timeout=5 * PERSIST_S + 10)
    agent.kill()
    assert open_id not in rig.obs.ids("end")

    again = rig.agent()
    wait_until(lambda: open_id in rig.obs.ids("end"), "the restart end")
    ends = [a for a in rig.obs.alerts() if a["id"] == open_id and a["type"] == "end"]
    assert len(ends) == 1, ends
    assert ends[0]["reason"] == "restart" and ends[0]["end"] == iso_utc(sample_ts(last))
    assert ends[0]["start"] == iso_utc(sample_ts(first))
    again.wait_log("sending its end (reason restart")
    expected.add(open_id)
    w.normal(20)                         # the restarted agent's window refills
    expected |= set(w.spikes(3))
    rig.obs.wait_ids(expected)
    print(f"kill -9 with an alert open: {assert_exact(rig.obs, expected)}")
    assert len([a for a in rig.obs.alerts() if a["id"] == open_id and a["type"] == "end"]) == 1
    assert _persisted(rig.state) == []
    assert again.running()
    no_traceback(again)
