"""Builds the sinks a config asks for."""
from __future__ import annotations

from pathlib import Path

from ..config import AgentConfig
from ..metrics import Metrics
from ..outbox import Outbox
from .base import Sink
from .console import ConsoleSink
from .jsonl import JsonLinesSink
from .mqtt import MqttSink


class _OwningMqttSink(MqttSink):
    """The MQTT sink that also closes the outbox built for it."""

    def stop(self, timeout: float = 5.0) -> None:
        try:
            super().stop(timeout)
        finally:
            self.outbox.close()


def build_sinks(cfg: AgentConfig, metrics: Metrics) -> list[Sink]:
    sinks: list[Sink] = []
    if cfg.sinks.console.enabled:
        sinks.append(ConsoleSink(cfg.sinks.console.format))
    if cfg.sinks.jsonl:
        sinks.append(JsonLinesSink(cfg.sinks.jsonl.path, metrics=metrics))
    if cfg.mqtt.enabled:
        # Without a state dir the outbox lives in memory: alerts survive broker
        # outages, not restarts.
        if cfg.state_dir:
            Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
            path = str(Path(cfg.state_dir) / "outbox.sqlite")
        else:
            path = ":memory:"
        sinks.append(_OwningMqttSink(cfg, metrics, Outbox(path, metrics=metrics)))
    return sinks
