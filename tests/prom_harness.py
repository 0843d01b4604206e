"""The real agent with its Prometheus endpoint on (`metrics.listen`), for tests: the
agent_harness rig (tiny model, a pty serial line, a real broker) plus scraping over
HTTP, parsed with prometheus_client's own text parser."""
from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from agent_harness import STREAM, AgentProcess, LineWriter, Pty, tiny_model, wait_until, \
    write_config
from conftest import free_port, wait_port


def scrape(port: int, path: str = "/metrics") -> dict:
    """Family name -> prometheus_client Metric, from one GET (text format 0.0.4)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict, name: str, **labels) -> float | None:
    """The value of the sample `name` whose labels include `labels`, None if absent."""
    for f in families.values():
        for s in f.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def sample_names(families: dict) -> set[str]:
    return {s.name for f in families.values() for s in f.samples}


class MetricsRig:
    """One agent with a serial stream on a pty, MQTT to `broker_port`, /metrics on a free
    loopback port."""

    def __init__(self, d: Path, broker_port: int, **overrides) -> None:
        self.dir = d
        self.pty = Pty()
        self.writer = LineWriter(self.pty)
        self.port = free_port()
        self.config = write_config(
            d / "agent.yaml", model=tiny_model(d), port=broker_port, serial_port=self.pty.path,
            state_dir=d / "state", metrics={"listen": f"127.0.0.1:{self.port}"}, **overrides)
        self.agent = AgentProcess(self.config, d / "agent.log").start()

    def ready(self) -> "MetricsRig":
        """Until the endpoint answers and the serial source has opened the port."""
        wait_port(self.port, 60)
        wait_until(lambda: value(self.scrape(), "tsad_source_up", source=STREAM) == 1,
                   "tsad_source_up 1", 30)
        return self

    def scrape(self) -> dict:
        return scrape(self.port)

    def value(self, name: str, **labels) -> float | None:
        return value(self.scrape(), name, **labels)

    def wait(self, pred, what: str, timeout: float = 20.0) -> dict:
        """Scrapes until `pred(families)` holds; the families that satisfied it."""
        box = {}

        def check():
            box["f"] = self.scrape()
            return pred(box["f"])
        wait_until(check, what, timeout, step=0.2)
        return box["f"]

    def close(self) -> None:
        self.agent.close()
        self.pty.close()
