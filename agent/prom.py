"""The agent's metrics as Prometheus metric families (prometheus_client).

Two expositions share `shared_families` (the `Metrics` counters and the inference
histogram), so a metric has one name, type and meaning in both: the daemon's endpoint
(`metrics.listen`, agent/metrics_server.py, with `DaemonCollector`) and the API
server's GET /metrics (agent/http/prometheus.py).  Both add the standard process_*,
python_info and python_gc_* families (`standard_registry`).

Rules of the daemon's collector:
- The engine, the sources and the sinks belong to the pipeline thread.  It publishes a
  `Snapshot` of plain values at most every SNAPSHOT_S from its tick (`publish`); a
  scrape, on an HTTP thread, reads the latest snapshot (one reference, swapped whole)
  and the `Metrics` counters (ints and dicts copied under the GIL), never an engine,
  source or sink object.
- The collector lives as long as the process; a reload (SIGHUP) swaps the pipeline and
  the next tick publishes from the new one, so the endpoint never stops serving.
- Label cardinality is bounded by the streams the engine holds: at most each source's
  `max_streams` (one stream per serial line, 256 by default per topic-named MQTT
  subscription), times the model's channels for tsad_stream_channel_missing (only those
  that put a stream in no_data).  A stream dropped from memory (idle eviction, a reload
  that removes it) drops its series, its alert counters included.
- A stream's last-sample age is computed at scrape time from the monotonic arrival
  time of its newest batch: it keeps growing while nothing arrives, even when the
  pipeline thread itself is stuck.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, InfoMetricFamily)

from . import __version__
from .metrics import Metrics
from .stream_status import LISTED, STATES

SNAPSHOT_S = 1.0


def standard_registry(*collectors) -> CollectorRegistry:
    """A registry holding `collectors` and the collectors of prometheus_client's default
    registry (process_*, python_info, python_gc_*), private so that two servers in one
    process (the tests) never share one."""
    reg = CollectorRegistry()
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    for c in collectors:
        reg.register(c)
    return reg


def _counter(name: str, doc: str, label: str | None = None, values=None):
    f = CounterMetricFamily(name, doc, labels=[label] if label else None)
    for key, n in sorted((values or {}).items()):
        f.add_metric([str(key)], n)
    return f


def shared_families(metrics: Metrics, model: str | None, ep: str | None) -> list:
    """The families every exposition of the agent has; tsad_build_info once the model
    (name, execution provider) is known."""
    m = metrics.snapshot()
    out = [
        CounterMetricFamily("tsad_samples", "Samples received.", value=m["samples_in"]),
        CounterMetricFamily("tsad_samples_idle", "Samples received while their machine was "
                            "stopped (running:), not judged.", value=m["samples_idle"]),
        CounterMetricFamily("tsad_windows", "Windows run through the model.",
                            value=m["windows_inferred"]),
        CounterMetricFamily("tsad_engine_steps", "Engine steps (each takes what arrived since "
                            "the last).", value=m["steps"]),
        CounterMetricFamily("tsad_engine_stream_steps", "Streams stepped, summed over the "
                            "steps: samples / this = samples a stream gets per step.",
                            value=m["stream_steps"]),
        CounterMetricFamily("tsad_windows_skipped", "Windows not scored: a value missing "
                            "beyond the forward fill.", value=m["windows_skipped"]),
        _counter("tsad_malformed", "Rejected input, by reason.", "reason", m["malformed"]),
        _counter("tsad_dropped", "Data or events dropped, by reason.", "reason", m["dropped"]),
        _counter("tsad_errors", "Failures contained (a stream step, a sink), by where.",
                 "where", m["errors"]),
    ]
    buckets, total, count = metrics.infer_histogram()
    out.append(HistogramMetricFamily(
        "tsad_inference_seconds", "ONNX Runtime call latency.",
        buckets=[(f"{le:g}", n) for le, n in buckets] + [("+Inf", count)], sum_value=total))
    out.append(GaugeMetricFamily("tsad_uptime_seconds", "Seconds since start.",
                                 value=m["uptime_s"]))
    if model is not None:
        out.append(InfoMetricFamily("tsad_build", "Version, model and execution provider.",
                                    value={"version": __version__, "model": model,
                                           "ep": str(ep)}))
    return out


@dataclass(frozen=True)
class StreamView:
    id: str
    state: str
    shelved: bool
    last_seen: float        # monotonic time of its newest batch
    samples: int
    threshold: float | None
    score: float | None     # its latest window's score; None before its first
    missing: tuple[str, ...]    # channels without a value (no_data), else ()
    unacked: bool           # its latest alert awaits an ack (open, or ended unacknowledged)


@dataclass(frozen=True)
class Snapshot:
    model: str
    ep: str
    streams: tuple[StreamView, ...]
    sources: tuple[tuple[str, str, bool, int], ...]  # (stream id, type, connected, disconnects)
    alerts: dict                                   # (stream, event type) -> count
    outbox_depth: int | None                       # None: no MQTT sink
    mqtt_connected: bool | None
    mqtt_disconnects: int | None


def _finite(v) -> float | None:
    return None if v is None or v != v else float(v)


def take_snapshot(engine, runners, sinks, metrics: Metrics) -> Snapshot:
    """The pipeline's state as plain values (pipeline thread only).  Scores and alert
    counts of streams the engine no longer holds are forgotten here, on the thread that
    writes them, which bounds them by the engine's streams."""
    streams = engine.streams
    for table in (metrics.stream_scores, metrics.stream_alerts):
        for key in [k for k in table if (k if isinstance(k, str) else k[0]) not in streams]:
            del table[key]
    views = tuple(StreamView(st.id, st.state, st.shelved,
                             st.last_seen, st.samples, _finite(st.threshold),
                             metrics.stream_scores.get(st.id), st.no_data[:LISTED],
                             st.tracker.alarm in ("unacknowledged", "rtn_unacknowledged"))
                  for st in streams.values())
    # the MQTT sink's durable outbox: the alerts the broker has not acknowledged yet
    mqtt = next((s for s in sinks if hasattr(s, "outbox")), None)
    return Snapshot(
        engine.meta.name, engine.detector.ep, views,
        tuple((r.stream.id, r.stream.source.type, bool(r.source.connected),
               r.source.disconnects) for r in runners),
        dict(metrics.stream_alerts),
        None if mqtt is None else mqtt.outbox.depth(),
        None if mqtt is None else bool(mqtt.connected),
        None if mqtt is None else mqtt.disconnects)


class DaemonCollector:
    """The daemon's families: the shared ones, per-stream state and alerts, sources, the
    outbox.  `publish` on the pipeline thread, `collect` on any thread."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.snapshot: Snapshot | None = None
        self._taken = float("-inf")

    def publish(self, engine, runners, sinks) -> None:
        now = time.monotonic()
        if now - self._taken >= SNAPSHOT_S:
            self._taken = now
            self.snapshot = take_snapshot(engine, runners, sinks, self.metrics)

    def collect(self):
        snap = self.snapshot
        if snap is None:        # before the pipeline's first tick
            return shared_families(self.metrics, None, None)
        return shared_families(self.metrics, snap.model, snap.ep) + _stream_families(snap)


def _stream_families(snap: Snapshot) -> list:
    now = time.monotonic()
    g = {name: GaugeMetricFamily(name, doc, labels=["stream"]) for name, doc in (
        ("tsad_stream_score", "Score of the stream's latest window."),
        ("tsad_stream_threshold", "The stream's threshold: a window scoring at or over it "
                                  "is anomalous."),
        ("tsad_stream_shelved", "1 while an operator has shelved the stream's alerts."),
        ("tsad_stream_unacknowledged", "1 while the stream's latest alert awaits an "
                                       "operator's acknowledgement, open or ended."),
        ("tsad_stream_last_sample_age_seconds", "Seconds since the stream's newest sample "
                                                "arrived."))}
    state = GaugeMetricFamily("tsad_stream_state", "1 for the state the stream is in "
                              "(learning, warming_up, normal, anomaly, no_data, idle), 0 for the "
                              "others.",
                              labels=["stream", "state"])
    missing = GaugeMetricFamily("tsad_stream_channel_missing", "1 for each channel that left "
                                "the stream in no_data: no value past the forward fill.",
                                labels=["stream", "channel"])
    samples = CounterMetricFamily("tsad_stream_samples", "Samples of the stream taken in "
                                  "since it was created.", labels=["stream"])
    for s in snap.streams:
        # while a stream learns (again), its last score and threshold belong to a baseline
        # it is replacing: a panel would show a score over a threshold that no longer holds
        if s.score is not None and s.state != "learning":
            g["tsad_stream_score"].add_metric([s.id], s.score)
        if s.threshold is not None and s.state != "learning":
            g["tsad_stream_threshold"].add_metric([s.id], s.threshold)
        g["tsad_stream_shelved"].add_metric([s.id], int(s.shelved))
        g["tsad_stream_unacknowledged"].add_metric([s.id], int(s.unacked))
        if s.samples:       # a stream a command made has no sample to be old
            g["tsad_stream_last_sample_age_seconds"].add_metric([s.id], max(0.0, now - s.last_seen))
        for name in STATES:
            state.add_metric([s.id, name], int(s.state == name))
        samples.add_metric([s.id], s.samples)
        for ch in s.missing:
            missing.add_metric([s.id, ch], 1)
    alerts = CounterMetricFamily("tsad_alerts", "Alert events (new, update, end) by stream.",
                                 labels=["stream", "type"])
    for (sid, typ), n in sorted(snap.alerts.items()):
        alerts.add_metric([sid, typ], n)
    up = GaugeMetricFamily("tsad_source_up", "1 while the stream's source is connected (serial "
                           "port open, MQTT subscription up).",
                           labels=["source", "type"])
    lost = CounterMetricFamily("tsad_source_disconnects", "Connections the stream's source "
                               "lost (serial port gone, MQTT connection dropped).",
                               labels=["source", "type"])
    for sid, typ, connected, n in snap.sources:
        up.add_metric([sid, typ], int(connected))
        lost.add_metric([sid, typ], n)
    out = [*g.values(), state, missing, samples, alerts, up, lost,
           GaugeMetricFamily("tsad_streams", "Streams held in memory.", value=len(snap.streams))]
    if snap.outbox_depth is not None:
        out += [GaugeMetricFamily("tsad_outbox_depth", "Alert events waiting for the broker's "
                                  "acknowledgement.", value=snap.outbox_depth),
                GaugeMetricFamily("tsad_mqtt_connected", "1 while connected to the MQTT broker.",
                                  value=int(snap.mqtt_connected)),
                CounterMetricFamily("tsad_mqtt_disconnects", "Connections to the MQTT broker "
                                    "the alert sink lost.", value=snap.mqtt_disconnects)]
    return out
