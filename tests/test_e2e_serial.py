"""End to end with real parts: a SKAB recording written to a real pseudo-terminal,
the agent as a separate process reading it as a serial port, a real Mosquitto
broker, and a paho subscriber that checks what an operator's dashboard would get.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import numpy as np
import pandas as pd
import pytest

from conftest import MODELS

MODEL = MODELS / "DLinear_ad.onnx"


class Subscriber:
    def __init__(self, port: int, topic: str):
        self.msgs: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-sub")
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on_message(self, c, u, m):
        with self.lock:
            self.msgs.append((m.topic, m.payload, m.retain))

    def wait(self, pred, timeout: float) -> list:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                hits = [m for m in self.msgs if pred(m)]
            if hits:
                return hits
            time.sleep(0.05)
        return []

    def alerts(self) -> list[dict]:
        with self.lock:
            return [json.loads(p) for t, p, _ in self.msgs if t.endswith("/alerts")]

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def _config(tmp: Path, port: int, tty: str) -> Path:
    cfg = f"""
node: e2e
state_dir: {tmp / 'state'}
model:
  path: {MODEL}
  # the plumbing under test, not the model's fitted policy: the agent's own defaults
  policy: false
streams:
  - id: pump
    source: {{type: serial, port: {tty}, baud: 115200, protocol: csv, timestamp: first}}
calibration: {{enabled: true, samples: 400}}
alerts: {{open_k: 3, open_n: 5, close_m: 10}}
mqtt:
  host: 127.0.0.1
  port: {port}
  keepalive: 5
  health_interval_s: 1
sinks:
  console: {{enabled: false}}
"""
    p = tmp / "agent.yaml"
    p.write_text(cfg)
    return p


@pytest.mark.slow
def test_serial_to_mqtt_alert_lifecycle(tmp_path, broker, skab_dir):
    if not MODEL.exists():
        pytest.skip(f"shipped model missing: {MODEL}")
    df = pd.read_csv(skab_dir / "valve1" / "1.csv", sep=";", parse_dates=["datetime"])
    ts = ((df["datetime"] - pd.Timestamp(0)).dt.total_seconds()).to_numpy().astype(np.int64)
    lab = df["anomaly"].to_numpy() > 0
    a_start, a_end = ts[lab].min(), ts[lab].max()
    cols = [c for c in df.columns if c not in ("datetime", "anomaly", "changepoint")]

    master, slave = os.openpty()
    tty = os.ttyname(slave)
    sub = Subscriber(broker.port, "tsad/e2e/#")
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config",
                              str(_config(tmp_path, broker.port, tty))],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert sub.wait(lambda m: m[0] == "tsad/e2e/availability" and m[1] == b"online", 30), \
            "agent never came online"
        # the writer: one CSV line per row, leading epoch timestamp, plus garbage that
        # must be counted and skipped
        for i, row in enumerate(df[cols].to_numpy()):
            line = f"{ts[i]}," + ",".join(f"{v:.6g}" for v in row) + "\n"
            os.write(master, line.encode())
            if i == 100:
                os.write(master, b"\xff\xfe garbage\n1,2,3\n")
            if i % 50 == 0:
                time.sleep(0.01)
        ends = sub.wait(lambda m: m[0] == "tsad/e2e/alerts" and b'"type":"end"' in m[1], 60)
        alerts = sub.alerts()
        new = [a for a in alerts if a["type"] == "new"]
        end = [a for a in alerts if a["type"] == "end"]
        assert new, f"no 'new' alert; got {alerts}"
        assert ends and end, f"no 'end' alert; got {[a['type'] for a in alerts]}"
        first = new[0]
        start_s = pd.Timestamp(first["start"]).timestamp()
        assert a_start <= start_s <= a_end, (first["start"], a_start, a_end)
        end_s = pd.Timestamp(end[-1]["end"]).timestamp()
        # `end` is when the signal came back; SKAB's labels run on ~30-50 s after the flow
        # has recovered, so the alert may close a little before the label does, never
        # long before it, and not long after it.
        assert a_end - 60 <= end_s <= a_end + 120, (end[-1]["end"], a_end)
        assert first["model"]["name"] == "DLinear_ad" and first["node"] == "e2e"
        assert first["top_channels"] and abs(sum(c["share"] for c in first["top_channels"])) <= 1.0001
        assert {a["id"] for a in alerts if a["type"] == "end"} <= {a["id"] for a in new}

        health = sub.wait(lambda m: m[0] == "tsad/e2e/health"
                          and json.loads(m[1])["samples_in"] == len(df), 15)
        assert health, "health never reported every sample written as received"
        h = json.loads(health[-1][1])
        assert sum(h["malformed"].values()) >= 2
        # a late subscriber gets the retained health and availability
        late = Subscriber(broker.port, "tsad/e2e/#")
        assert late.wait(lambda m: m[0] == "tsad/e2e/health" and m[2], 10)
        state = late.wait(lambda m: m[0] == "tsad/e2e/stream/pump/state", 10)
        assert state and state[-1][1] in (b"normal", b"anomaly")
        late.close()

        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        assert sub.wait(lambda m: m[0] == "tsad/e2e/availability" and m[1] == b"offline", 30), \
            "last will 'offline' not received after SIGKILL"
    finally:
        if agent.poll() is None:
            agent.kill()
        out = agent.stdout.read().decode(errors="replace")
        sub.close()
        os.close(master)
        os.close(slave)
    assert "Traceback" not in out, out
