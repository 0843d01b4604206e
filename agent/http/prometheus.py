"""Prometheus text exposition (format 0.0.4) of the API server's metrics."""
from __future__ import annotations

from collections import Counter

from .. import __version__
from .service import AnomalyService


def _label(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def metrics_text(svc: AnomalyService, requests: Counter, transport: Counter,
                 waiting: int) -> str:
    """`transport`: the server's connection counters (busy_queue, busy_large_queue,
    busy_open, timeout); `waiting`: requests queued for a worker now."""
    snap = svc.metrics.snapshot()
    out: list[str] = []

    def family(name: str, kind: str, help_: str, samples) -> None:
        """samples: (name suffix, labels, value)"""
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            lab = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            out.append(f"{name}{suffix}{{{lab}}} {value}" if lab else f"{name}{suffix} {value}")

    family("tsad_samples_total", "counter", "Samples received (files, windows, streams).",
           [("", {}, snap["samples_in"])])
    family("tsad_windows_total", "counter", "Windows run through the model.",
           [("", {}, snap["windows_inferred"])])
    family("tsad_malformed_total", "counter", "Rejected input, by reason.",
           [("", {"reason": r}, n) for r, n in sorted(snap["malformed"].items())])
    buckets, total, count = svc.metrics.infer_histogram()
    family("tsad_inference_seconds", "histogram", "ONNX Runtime call latency.",
           [("_bucket", {"le": f"{le:g}"}, n) for le, n in buckets]
           + [("_bucket", {"le": "+Inf"}, count), ("_sum", {}, f"{total:.9g}"),
              ("_count", {}, count)])
    family("tsad_outbox_depth", "gauge", "Alerts waiting for the broker (none in serve).",
           [("", {}, 0)])
    family("tsad_streams", "gauge", "Named streams held in memory.",
           [("", {}, svc.stream_count())])
    family("tsad_http_requests_total", "counter", "HTTP requests, by path and status.",
           [("", {"path": p, "code": str(c)}, n) for (p, c), n in sorted(requests.items())])
    family("tsad_http_busy_total", "counter",
           "Requests refused with 503: a worker queue full (queue, large_queue), too many "
           "open connections (open).",
           [("", {"reason": r}, transport[f"busy_{r}"]) for r in ("queue", "large_queue", "open")])
    family("tsad_http_timeouts_total", "counter",
           "Requests cut off by the whole-request deadline.", [("", {}, transport["timeout"])])
    family("tsad_http_waiting", "gauge", "Requests waiting for a worker.",
           [("", {}, waiting)])
    family("tsad_uptime_seconds", "gauge", "Seconds since start.", [("", {}, snap["uptime_s"])])
    family("tsad_build_info", "gauge", "Build and model (value always 1).",
           [("", {"version": __version__, "model": svc.meta.name, "ep": svc.detector.ep}, 1)])
    return "\n".join(out) + "\n"
