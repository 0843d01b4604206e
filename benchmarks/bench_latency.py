"""Sample -> alert latency and agent memory, through real parts.

A sample written to a real pseudo-terminal is read by the agent (a separate
`tsad-agent run` process, serial source), inferred, turns into an alert that is
published to a real Mosquitto broker, and received by a paho subscriber in this
process. Latency = time from `os.write` of the anomalous sample to the arrival of
its `new` alert (same clock). Also reports the agent's peak RSS (VmHWM).

    python benchmarks/bench_latency.py [--models AutoEncoder_ad,DLinear_ad] [--alerts 200] [--batch-wait 0]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import local_broker  # noqa: E402  (beside this script)
from agent.detector import Detector  # noqa: E402
from agent.model_meta import load_meta  # noqa: E402
from agent.contract import score_windows  # noqa: E402


def vm(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])   # kB
    return 0


def run_model(name: str, n_alerts: int, tmp: Path, port: int, batch_wait: str = "auto") -> dict:
    model = REPO / "models_onnx" / f"{name}.onnx"
    meta = load_meta(model)
    W = meta.window
    mean, std = np.asarray(meta.scaler.mean), np.asarray(meta.scaler.std)
    # A threshold between the score of a steady window and of one ending in the spike
    # (geometric mean), so each spike opens exactly one alert whatever the model.
    steady = np.tile(mean, (W, 1))
    spiked = steady.copy()
    spiked[-1] += 50 * std
    x = ((np.stack([steady, spiked]) - mean) / std).astype(np.float32)
    s_steady, s_spike = score_windows(x, Detector(str(model)).infer(x))[0]
    threshold = float(np.sqrt(max(s_steady, 1e-12) * s_spike))
    master, slave = os.openpty()
    cfg = tmp / f"{name}.yaml"
    # Fixed threshold, opening on 1 window and closing after W normal ones (once the spike
    # has left the window, whatever the model mixes in time): every spike is one alert,
    # so each alert's start time names the sample that caused it.  `policy: false`: the
    # model's own policy (a learning period, smoothing over several windows, adaptation)
    # would delay or swallow single-sample spikes on purpose; this measures the pipeline.
    cfg.write_text(f"""
node: bench
state_dir: null
model: {{path: {model}, policy: false, batch_wait_s: {batch_wait}}}
streams:
  - id: s
    source: {{type: serial, port: {os.ttyname(slave)}, protocol: csv, timestamp: first}}
scoring: {{threshold: {threshold}}}
alerts: {{open_k: 1, open_n: 1, close_m: {W}, update_interval_s: 3600}}
mqtt: {{host: 127.0.0.1, port: {port}, score_interval_s: 3600, health_interval_s: 3600}}
sinks: {{console: {{enabled: false}}}}
""")
    got: dict[int, float] = {}
    ev = threading.Event()

    def on_message(c, u, m):
        a = json.loads(m.payload)
        if a["type"] == "new":
            got[int(a["id"].rsplit(":", 1)[1]) // 1000] = time.perf_counter()
            ev.set()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{name}")
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe("tsad/bench/alerts", qos=1)
    sub.loop_start()
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                             cwd=REPO, stderr=open(tmp / f"{name}.log", "w"))
    time.sleep(3.0)          # model load + warm-up + broker connect
    t = 1_700_000_000
    normal = ",".join(f"{v:.6g}" for v in mean)
    spike = ",".join(f"{v:.6g}" for v in mean + 50 * std)
    sent: dict[int, float] = {}
    lat = []
    try:
        for _ in range(n_alerts):
            # 2W normal samples: the spike leaves the window and the alert closes (models
            # that mix time steps score windows still holding the spike as anomalous)
            os.write(master, "".join(f"{t + i},{normal}\n" for i in range(2 * W)).encode())
            t += 2 * W
            # Idle before the spike: its latency must be its own, not the queue of those
            # 2W windows (one batch of 128 costs PatchTST_ad ~16 ms on this VM).
            time.sleep(0.15)
            ev.clear()
            sent[t] = time.perf_counter()
            os.write(master, f"{t},{spike}\n".encode())
            ev.wait(2.0)
            if t in got:
                lat.append((got[t] - sent[t]) * 1e3)
            t += 1
        rss_peak = vm(agent.pid, "VmHWM")
        rss_now = vm(agent.pid, "VmRSS")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(10)
        sub.loop_stop()
        os.close(master)
        os.close(slave)
    lat.sort()
    return {"model": name, "alerts": len(lat), "sent": n_alerts,
            "p50_ms": statistics.median(lat) if lat else None,
            "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "rss_peak_mb": rss_peak / 1024, "rss_mb": rss_now / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="AutoEncoder_ad,DLinear_ad,Nonstationary_ad,PatchTST_ad,TimesNet_ad")
    ap.add_argument("--alerts", type=int, default=200)
    ap.add_argument("--batch-wait", default="auto", help="model.batch_wait_s (default: auto)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker, port = local_broker.start(Path(tmp))
        try:
            print(f"{'model':<17} {'alerts':>7} {'p50 ms':>7} {'p99 ms':>7} {'peak RSS MB':>11}")
            for name in a.models.split(","):
                r = run_model(name, a.alerts, Path(tmp), port, a.batch_wait)
                if r["p50_ms"] is None:
                    print(f"{name:<17} no alerts received (see the agent log)")
                    continue
                print(f"{r['model']:<17} {r['alerts']:>3}/{r['sent']:<3} {r['p50_ms']:7.2f} "
                      f"{r['p99_ms']:7.2f} {r['rss_peak_mb']:11.1f}")
        finally:
            broker.terminate()


if __name__ == "__main__":
    main()
