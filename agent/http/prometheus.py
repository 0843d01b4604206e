"""Prometheus text exposition (format 0.0.4) of the API server's metrics: the families
every exposition of the agent shares (agent/prom.py), the server's own, and the
standard process ones.  There is no outbox here (serve publishes nothing to a broker),
so no tsad_outbox_depth: the daemon's endpoint has the real one."""
from __future__ import annotations

from collections import Counter

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..prom import shared_families, standard_registry
from .service import AnomalyService

_PROCESS = standard_registry()


class _Families:
    """Families built for one scrape, in the shape generate_latest reads."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return self.families


def metrics_text(svc: AnomalyService, requests: Counter, transport: Counter,
                 waiting: int) -> str:
    """`transport`: the server's connection counters (busy_queue, busy_large_queue,
    busy_open, timeout); `waiting`: requests queued for a worker now."""
    out = shared_families(svc.metrics, svc.meta.name, svc.detector.ep)
    out.append(GaugeMetricFamily("tsad_streams", "Named streams held in memory.",
                                 value=svc.stream_count()))
    req = CounterMetricFamily("tsad_http_requests", "HTTP requests, by path and status.",
                              labels=["path", "code"])
    for (path, code), n in sorted(requests.items()):
        req.add_metric([path, str(code)], n)
    busy = CounterMetricFamily("tsad_http_busy", "Requests refused with 503: a worker queue "
                               "full (queue, large_queue), too many open connections (open).",
                               labels=["reason"])
    for r in ("queue", "large_queue", "open"):
        busy.add_metric([r], transport[f"busy_{r}"])
    out += [req, busy,
            CounterMetricFamily("tsad_http_timeouts", "Requests cut off by the whole-request "
                                "deadline.", value=transport["timeout"]),
            GaugeMetricFamily("tsad_http_waiting", "Requests waiting for a worker.",
                              value=waiting)]
    return (generate_latest(_Families(out)) + generate_latest(_PROCESS)).decode()
