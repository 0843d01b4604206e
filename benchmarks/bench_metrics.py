"""Cost of the daemon's Prometheus endpoint with many streams.

An engine with N streams of one topic-named MQTT source (the shipped DLinear_ad, its
own scaler and threshold), fed random values through the prometheus sink: far from the
pump data the model knows, so every stream has a score and an open alert (the most
series a stream can have); then, pinned to one core:
  * the snapshot the pipeline thread takes (at most once a second), µs,
  * one exposition built in process (collect + text format), ms,
  * one scrape over loopback HTTP from prometheus_client's server, ms, and its size.

    python benchmarks/bench_metrics.py [--streams 50] [--scrapes 200]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prometheus_client import generate_latest  # noqa: E402

from agent.detector import Detector  # noqa: E402
from agent.engine import Engine  # noqa: E402
from agent.jobs import detection_config  # noqa: E402
from agent.metrics import Metrics  # noqa: E402
from agent.metrics_server import MetricsConfig, MetricsServer  # noqa: E402
from agent.prom import DaemonCollector, standard_registry, take_snapshot  # noqa: E402
from agent.shipped import resolve_model  # noqa: E402
from agent.sinks.prometheus import PrometheusSink  # noqa: E402
from agent.sources.base import Batch  # noqa: E402


def loaded_engine(n: int, metrics: Metrics) -> Engine:
    det = Detector(resolve_model("DLinear_ad"), metrics=metrics)
    e = Engine(detection_config(det.meta, 0), det, metrics=metrics, max_streams={"bus": n})
    sink = PrometheusSink(metrics)
    rng = np.random.default_rng(0)
    rows = det.meta.window + 64
    for i in range(n):
        v = rng.normal(size=(rows, det.meta.n_channels)).astype(np.float32)
        for r in e.step([Batch(f"dev{i:03d}", 1e9 + np.arange(rows, dtype=float), v,
                               source="bus")]):
            sink.scores(r.stream, r.ts, r.scores, r.threshold, r.labels, r.alert_open)
            for ev in r.events:
                sink.alert(ev)
    return e


def median_ms(f, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=50)
    ap.add_argument("--scrapes", type=int, default=200)
    a = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    m = Metrics()
    e = loaded_engine(a.streams, m)
    runners = [SimpleNamespace(stream=SimpleNamespace(id="bus", source=SimpleNamespace(
        type="mqtt")), source=SimpleNamespace(connected=True))]
    col = DaemonCollector(m)
    col.publish(e, runners, [])
    snap_us = median_ms(lambda: take_snapshot(e, runners, [], m), a.scrapes) * 1e3
    reg = standard_registry(col)
    build_ms = median_ms(lambda: generate_latest(reg), a.scrapes)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = MetricsServer(MetricsConfig(listen=port), col)

    def scrape():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return r.read()
    body = scrape()
    http_ms = median_ms(scrape, a.scrapes)
    srv.close()
    alerts = sum(1 for k in m.stream_alerts if k[1] == "new")
    print(f"{a.streams} streams ({alerts} with an alert), {len(body.splitlines())} lines, "
          f"{len(body) / 1024:.1f} KiB per scrape")
    print(f"snapshot (pipeline thread, <= 1/s): {snap_us:.0f} µs")
    print(f"exposition in process: {build_ms:.2f} ms;  HTTP scrape over loopback: "
          f"{http_ms:.2f} ms  (medians of {a.scrapes})")


if __name__ == "__main__":
    main()
