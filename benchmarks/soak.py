"""Soak test: many MQTT streams at a steady rate through a real broker into the agent.

N streams x R Hz for D seconds are published by one client on `plant/<stream>/sensors`
(CSV lines `ts,ch1..chC`, B samples per message) into mosquitto; the agent runs as
its own process with an MQTT source on `plant/+/sensors` (stream id from the topic),
a shipped model with per-stream calibration, and the MQTT sink.  Each stream gets a
short burst of large values every --anomaly-every seconds so alerts flow too.

Reported: samples sent vs the agent's samples_in (drops must be 0), windows inferred,
alerts, malformed/dropped counters, inference latency, the agent's RSS (VmRSS) at
start / end / max and its CPU % (from /proc/<pid>/stat), sampled every few seconds.

    python benchmarks/soak.py                       # 50 streams x 100 Hz for 600 s
    python benchmarks/soak.py --duration 120 --json soak.json
    python benchmarks/soak.py --streams 50,500 --rate 10 --duration 120 --anomaly-every 0
    python benchmarks/soak.py --streams 50,500 --rate 10 --duration 90 --anomaly-every 0 \
        --read-bytes 0 --stagger 30      # paho's own reads; streams that start apart

Several stream counts run one after the other, each with a fresh agent and broker; the
cost of a stream is then the difference of the agents' RSS at the end, steady after
learning, over the difference of the counts (KB per stream).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

import local_broker  # beside this script

REPO = Path(__file__).resolve().parents[1]
SKAB_FREE = REPO.parent / "shared" / "data" / "skab" / "anomaly-free" / "anomaly-free.csv"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# Sample times advance by the recording's own interval (a row a second), whatever the
# publishing rate.  The policy's time constants are in sample time: the recording's hours of
# thermal drift stamped 10 ms apart drift a hundred times faster than the pump ever did,
# and the streams of a "normal" benchmark would spend it in alarm (bench_ingest at 50 x 100,
# 2026-12-06: 119 alerts in 20 s stamped 10 ms apart, 33 a second apart; the rest came from
# streams that started at other rows, see row_at).
SAMPLE_INTERVAL_S = 1.0


def normal_rows(channels: list[str], mean, std, n: int, seed: int) -> np.ndarray:
    """Normal operating data: the SKAB anomaly-free recording when present (what the
    shipped models were trained on), else Gaussian noise around the model's scaler."""
    if SKAB_FREE.exists():
        import pandas as pd
        df = pd.read_csv(SKAB_FREE, sep=";")
        return df[channels].to_numpy(np.float64)
    rng = np.random.default_rng(seed)
    return rng.normal(mean, std, (n, len(channels)))


def row_at(i: int, n: int) -> int:
    """The row every stream sends as its i-th sample: the recording from its first row, as
    the shipped policies' margins were fitted to learn it (a stream that learns on a later
    stretch of it can raise alerts: docs/RESULTS.md, eighth session), back and forth over its
    n rows, so a stream that reaches the end goes on without a jump to the first row (a step
    the models rightly alarm on)."""
    j = i % (2 * n - 2)
    return j if j < n else 2 * n - 2 - j


def smaps_mb(pid: int) -> dict[str, float]:
    """The process's RSS by what it maps, in MB, largest first: a shared library or file by
    its name (onnxruntime's library, numpy's, ...), anonymous memory as "[anon]"."""
    out: dict[str, float] = {}
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(None, 1)[0]
        if "-" in first and not first.endswith(":"):        # a mapping's header line
            parts = line.split()
            path = parts[5] if len(parts) > 5 else "[anon]"     # the brk heap is anonymous too
            name = "[anon]" if path == "[heap]" else path if path.startswith("[") else \
                "/".join(Path(path).parts[-2:]) if "site-packages" in path else Path(path).name
        elif first == "Rss:":
            out[name] = out.get(name, 0) + int(line.split()[1]) / 1024
    return dict(sorted(((k, round(v, 1)) for k, v in out.items() if v >= 0.1),
                       key=lambda kv: -kv[1]))


def proc_stats(pid: int) -> tuple[int, int]:
    """(VmRSS in kB, utime + stime in clock ticks) of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return rss, int(fields[11]) + int(fields[12])     # utime, stime (fields 14, 15)


class Sampler(threading.Thread):
    """RSS and CPU % of the agent every `every` seconds."""

    def __init__(self, pid: int, every: float):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.rows: list[tuple[float, int, float]] = []    # (t, rss_kb, cpu %)
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        prev_t, (_, prev_ticks) = t0, proc_stats(self.pid)
        while not self.stop.wait(self.every):
            try:
                rss, ticks = proc_stats(self.pid)
            except (FileNotFoundError, ProcessLookupError):
                return
            now = time.monotonic()
            cpu = 100.0 * (ticks - prev_ticks) / CLK_TCK / (now - prev_t)
            self.rows.append((now - t0, rss, cpu))
            prev_t, prev_ticks = now, ticks


class HealthWatch:
    def __init__(self, port: int, node: str):
        self.last: dict | None = None
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="soak-health")
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(f"tsad/{node}/health", qos=1)
        self.c.on_message = self._msg
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _msg(self, c, u, m) -> None:
        self.last = json.loads(m.payload)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


class AgentRun:
    """The agent as its own process on a fresh local broker: an MQTT source on
    `plant/+/sensors` (the stream id from the topic), the MQTT sink on, `extra` config
    sections merged in; a health watcher and a connected publisher beside it.  Entering
    returns once the source is subscribed; leaving stops them all (`rc`: the agent's exit).
    `argv` runs the CLI some other way (bench_daemon_sites.py: under tracemalloc)."""

    def __init__(self, work: Path, node: str, model: str, streams: int,
                 extra: dict | None = None, argv: list[str] | None = None):
        self.work, self.node = work, node
        self.model, self.streams, self.extra = model, streams, extra or {}
        self.argv = argv or [sys.executable, "-m", "agent.cli"]
        self.rc: int | str | None = None

    def __enter__(self) -> "AgentRun":
        import yaml
        work = self.work
        # No queue limits: a slow agent must show up as back-pressure and lag, not as
        # messages the broker threw away.
        self.broker, self.port = local_broker.start(
            work, "persistence false\nmax_queued_messages 0\nmax_queued_bytes 0\n")
        cfg = {
            "node": self.node, "log_level": "warning", "state_dir": str(work / "state"),
            "model": {"path": self.model},
            "streams": [{"id": "plant", "source": {"type": "mqtt", "topic": "plant/+/sensors",
                                                   "stream_from_topic": 1, "protocol": "csv",
                                                   "qos": 1, "max_streams": max(self.streams, 1)}}],
            "sinks": {"console": {"enabled": False}},
            **self.extra,
        }
        cfg["mqtt"] = {"host": "127.0.0.1", "port": self.port, **cfg.get("mqtt", {})}
        (work / "agent.yaml").write_text(yaml.safe_dump(cfg))
        self.agent = subprocess.Popen([*self.argv, "run", "--config", str(work / "agent.yaml")],
                                      cwd=REPO, stdout=open(work / "agent.log", "wb"),
                                      stderr=subprocess.STDOUT)
        self.health = HealthWatch(self.port, self.node)
        self.pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{self.node}-pub")
        self.pub.max_queued_messages_set(0)
        self.pub.connect("127.0.0.1", self.port)
        self.pub.loop_start()
        deadline = time.monotonic() + 60
        while not (self.health.last and self.health.last["sources"]["plant"]["connected"]):
            if self.agent.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise SystemExit(f"agent did not come up:\n{(work / 'agent.log').read_text()}")
            time.sleep(0.1)
        return self

    def samples_in(self) -> int:
        return (self.health.last or {}).get("samples_in", 0)

    def __exit__(self, *exc) -> None:
        self.pub.loop_stop()
        self.pub.disconnect()
        self.health.close()
        self.agent.terminate()
        try:
            self.rc = self.agent.wait(15)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            self.rc = "killed"
        self.broker.terminate()
        self.broker.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--streams", default="50", help="stream count, or counts: 50,500")
    ap.add_argument("--rate", type=float, default=100.0, help="samples/s per stream")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of publishing")
    ap.add_argument("--batch", type=int, default=10, help="samples per MQTT message")
    ap.add_argument("--model", default=str(REPO / "models_onnx" / "DLinear_ad.onnx"))
    ap.add_argument("--calibration", type=int, default=400, help="samples per stream (0: off)")
    ap.add_argument("--anomaly-every", type=float, default=30.0,
                    help="seconds between anomaly bursts per stream (0: none)")
    ap.add_argument("--sample-every", type=float, default=5.0, help="RSS/CPU sampling period")
    ap.add_argument("--read-bytes", type=int, default=None,
                    help="the agent's mqtt.read_bytes (0: paho's own reads; default: the "
                         "agent's, 16384 since 2026-12-07)")
    ap.add_argument("--stagger", type=float, default=0.0,
                    help="stream i starts publishing i/N x this many seconds late "
                         "(0: all streams start, and end their learning, together)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    counts = [int(n) for n in a.streams.split(",")]
    runs = []
    for n in counts:
        res = soak(a, n)
        if res is None:
            return 1
        runs.append(res)
    if len(runs) > 1:
        for lo, hi in zip(runs, runs[1:]):
            kb = (hi["rss_mb"]["end"] - lo["rss_mb"]["end"]) * 1024 / (hi["streams"] - lo["streams"])
            print(f"RSS at the end: {lo['streams']} streams {lo['rss_mb']['end']} MB, "
                  f"{hi['streams']} streams {hi['rss_mb']['end']} MB: {kb:.1f} KB per stream")
    if a.json:
        Path(a.json).write_text(json.dumps(runs[0] if len(runs) == 1 else runs, indent=1))
    return 0 if all(r["dropped_samples"] == 0 for r in runs) else 1


def soak(a, streams: int) -> dict | None:
    """One soak run with `streams` streams: its results, or None when the agent's log
    shows a traceback."""
    meta = json.loads(Path(a.model + ".json").read_text())
    channels, mean, std = meta["channels"], meta["scaler"]["mean"], meta["scaler"]["std"]
    work = Path(tempfile.mkdtemp(prefix="tsad-soak-"))
    extra = {"calibration": ({"enabled": True, "samples": a.calibration} if a.calibration
                             else {"enabled": False}),
             "mqtt": {"health_interval_s": 2.0,
                      **({} if a.read_bytes is None else {"read_bytes": a.read_bytes})}}
    with AgentRun(work, "soak", a.model, streams, extra) as run:
        agent, health, pub = run.agent, run.health, run.pub
        sampler = Sampler(agent.pid, a.sample_every)
        rss0 = proc_stats(agent.pid)[0]
        sampler.start()

        rows = normal_rows(channels, mean, std, 20000, 0)
        n_rows = len(rows)
        # pre-formatted value fields
        text = [",".join(f"{v:.6g}" for v in r) for r in rows]
        spike = ",".join(f"{m + 20 * s:.6g}" for m, s in zip(mean, std))
        sids = [f"s{i:02d}" for i in range(streams)]
        tick = a.batch / a.rate
        n_ticks = int(a.duration / tick)
        burst = max(1, int(a.rate))                    # one second of anomaly
        every = int(a.anomaly_every * a.rate) if a.anomaly_every else 0
        t_start = time.time()
        t0 = time.monotonic()
        sent = bursts = late = 0
        print(f"soak: {streams} streams x {a.rate:g} Hz for {a.duration:g} s "
              f"({streams * a.rate:g} samples/s, {a.batch}/message), model "
              f"{Path(a.model).stem}, broker :{run.port}, work dir {work}", flush=True)
        for k in range(n_ticks):
            for si, sid in enumerate(sids):
                if k * tick < a.stagger * si / streams:
                    continue
                lines = []
                for j in range(a.batch):
                    i = k * a.batch + j
                    # stagger the bursts so streams do not all alert at once
                    ph = (i + si * 37) % every if every and i >= 2 * a.calibration else -1
                    if 0 <= ph < burst:
                        vals = spike
                        bursts += ph == 0
                    else:
                        vals = text[row_at(i, n_rows)]
                    lines.append(f"{t_start + i * SAMPLE_INTERVAL_S:.3f},{vals}")
                pub.publish(f"plant/{sid}/sensors", "\n".join(lines), qos=1)
                sent += a.batch
            lag = t0 + (k + 1) * tick - time.monotonic()
            if lag > 0:
                time.sleep(lag)
            else:
                late += 1
            if k and k % int(30 / tick) == 0:
                h = health.last or {}
                r = sampler.rows[-1] if sampler.rows else (0, 0, 0)
                print(f"  t={time.monotonic() - t0:5.0f}s sent {sent} in {h.get('samples_in')} "
                      f"rss {r[1] / 1024:.0f} MB cpu {r[2]:.0f}%", flush=True)
        pub_s = time.monotonic() - t0
        # everything sent must arrive: wait for the agent to catch up
        deadline = time.monotonic() + 120
        while run.samples_in() < sent and time.monotonic() < deadline:
            time.sleep(0.5)
        caught_up = time.monotonic() - t0 - pub_s
        time.sleep(2.5)          # one more health period for the final counters
        sampler.stop.set()
        sampler.join()
        h = health.last or {}
        rss_end = proc_stats(agent.pid)[0]
        smaps = smaps_mb(agent.pid)

    cpu = [c for _, _, c in sampler.rows]
    res = {
        "streams": streams, "rate_hz": a.rate, "duration_s": a.duration, "batch": a.batch,
        "model": Path(a.model).stem, "calibration_samples": a.calibration,
        "publish_s": round(pub_s, 1), "publisher_late_ticks": late,
        "samples_sent": sent, "samples_in": h.get("samples_in"),
        "dropped_samples": sent - (h.get("samples_in") or 0),
        "catch_up_s_after_publishing": round(caught_up, 1),
        "windows_inferred": h.get("windows_inferred"),
        "windows_per_s": round((h.get("windows_inferred") or 0) / pub_s, 1),
        "anomaly_bursts_sent": bursts, "alerts": h.get("alerts"),
        "malformed": h.get("malformed"), "dropped": h.get("dropped"),
        "inference_ms": h.get("inference_ms"),
        "rss_by_mapping_mb": smaps,
        "rss_mb": {"start": round(rss0 / 1024, 1), "end": round(rss_end / 1024, 1),
                   "max": round(max([r for _, r, _ in sampler.rows] + [rss0]) / 1024, 1)},
        "cpu_percent": {"mean": round(float(np.mean(cpu)), 1) if cpu else None,
                        "max": round(float(np.max(cpu)), 1) if cpu else None},
        "rss_cpu_samples": [(round(t), round(r / 1024, 1), round(c, 1))
                            for t, r, c in sampler.rows],
        "agent_exit": run.rc,
    }
    print(json.dumps({k: v for k, v in res.items() if k != "rss_cpu_samples"}, indent=1))
    errors = (work / "agent.log").read_text(errors="replace")
    if "Traceback" in errors:
        print(f"agent log has a traceback:\n{errors[-3000:]}", file=sys.stderr)
        return None
    shutil.rmtree(work, ignore_errors=True)
    return res


if __name__ == "__main__":
    sys.exit(main())
