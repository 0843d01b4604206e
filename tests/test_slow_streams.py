"""A stream sampled more slowly than `mqtt.stale_after_s`, with the real agent and a real
Mosquitto: its availability stays online between samples and goes offline once samples
stop for its stale window (agent/staleness.py: STALE_INTERVALS intervals, the configured
or the learned one), and Home Assistant's score `expire_after` follows that window;
check-config says so."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import yaml

from agent.pace import PACE_STEPS
from agent.staleness import STALE_INTERVALS
from agent_harness import MOSQUITTO, AgentProcess, tiny_model, wait_until, write_config
from conftest import REPO
from test_mqtt_ops import P, ha_view, on, publish
from test_sink_mqtt import Sub

pytestmark = pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="mosquitto not installed")

STALE_S = 1.0       # mqtt.stale_after_s, under the streams' interval
EVERY_S = 2.0       # both streams' sampling interval, in sample time and in real time
WINDOW_S = STALE_INTERVALS * EVERY_S
STREAMS = ("given", "learnt", "fresh")


def sample(ts: float) -> bytes:
    return json.dumps({"ts": ts, "values": [0.0, 0.0, 0.0]}).encode()


def slow_config(tmp_path, port: int):
    path = write_config(tmp_path / "agent.yaml", model=tiny_model(tmp_path), port=port,
                        serial_port="-", state_dir=tmp_path / "state",
                        mqtt={"homeassistant": {"enabled": True}, "stale_after_s": STALE_S,
                              "score_interval_s": 0})
    cfg = yaml.safe_load(path.read_text())
    # "given": its interval_s says it; "learnt": it learns it from its first samples;
    # "fresh": still learning it throughout
    cfg["streams"] = [
        {"id": "given", "interval_s": EVERY_S,
         "source": {"type": "mqtt", "topic": "lines/given"}},
        {"id": "learnt", "source": {"type": "mqtt", "topic": "lines/learnt"}},
        {"id": "fresh", "source": {"type": "mqtt", "topic": "lines/fresh"}}]
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_a_stream_slower_than_stale_after_s_stays_online_between_samples(broker, tmp_path):
    sub = Sub(broker.port, [P + "#", "homeassistant/#"])
    agent = AgentProcess(slow_config(tmp_path, broker.port), tmp_path / "agent.log").start()
    try:
        agent.wait_log("subscribed to")
        # "learnt" learns its 2 s interval from the timestamps of its first PACE_STEPS + 1
        # samples, sent at once (a logger uploading its backlog)
        now = time.time()
        publish(broker.port, [("lines/learnt", sample(now - 80 + EVERY_S * i))
                              for i in range(PACE_STEPS + 1)])
        for _ in range(6):          # then all three live, one sample each EVERY_S
            last = time.monotonic()
            publish(broker.port, [(f"lines/{sid}", sample(time.time())) for sid in STREAMS])
            time.sleep(EVERY_S)
        for sid in ("given", "learnt"):
            seen = on(sub, f"stream/{sid}/availability")
            # no flapping: since its first online, never offline between samples
            assert "online" in seen and "offline" not in seen[seen.index("online"):], (sid, seen)
        # "fresh" knows nothing of its pace until its second sample (the first step), so
        # may go offline once before it; then it judges by the steps seen so far
        seen = on(sub, "stream/fresh/availability")
        assert "online" in seen and seen[seen.index("online"):].count("offline") <= 1, seen
        assert seen[-1] == "online", seen
        reg = ha_view(sub)
        for sid in ("given", "learnt"):
            _, score = reg.entities[f"{sid}_score"]
            assert score["expire_after"] == math.ceil(WINDOW_S), (sid, score)
        # the score's expire_after waits for a learned interval: sent once, not every step
        assert reg.entities["fresh_score"][1]["expire_after"] == math.ceil(STALE_S)
        gone: dict[str, float] = {}

        def offline() -> bool:
            for sid in STREAMS:
                if sid not in gone and on(sub, f"stream/{sid}/availability")[-1:] == ["offline"]:
                    gone[sid] = time.monotonic()
            return len(gone) == len(STREAMS)

        # samples stop: offline once the window has passed since the last, and no sooner
        wait_until(offline, "every stream offline", timeout=60)
        assert min(gone.values()) - last >= WINDOW_S - 0.1, (gone, last)
        assert on(sub, "availability")[-1] == "online"      # the node itself stays
    finally:
        agent.close()
        sub.close()


def test_check_config_notes_the_widened_window(tmp_path):
    p = subprocess.run([sys.executable, "-m", "agent.cli", "check-config",
                        str(slow_config(tmp_path, 1883))], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    notes = [ln for ln in p.stderr.splitlines() if "stale_after_s" in ln]
    # only the stream whose interval the config gives; "learnt" has none to judge yet
    assert notes == [f"note: streams[0] (given): interval_s 2 s: {STALE_INTERVALS} intervals "
                     f"are more than mqtt.stale_after_s 1 s, so the stream counts as offline "
                     f"after 6 s "
                     f"without a sample ({STALE_INTERVALS} intervals), not 1 s, and Home "
                     f"Assistant's score expires with it"], p.stderr


def test_the_note_comes_as_soon_as_three_intervals_widen_the_window():
    """At the 60 s default, a 30 s interval already makes the window 90 s (the docs
    audit: the note came only from 60 s up)."""
    from agent.staleness import widening_note
    assert widening_note(60.0, 20.0) is None
    assert "offline after 90 s" in widening_note(60.0, 30.0)
