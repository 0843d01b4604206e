"""Builds the sinks a config asks for."""
from __future__ import annotations

from pathlib import Path

from ..config import AgentConfig
from ..metrics import Metrics
from .base import Sink


def build_sinks(cfg: AgentConfig, metrics: Metrics) -> list[Sink]:
    sinks: list[Sink] = []
    if cfg.sinks.console.enabled:
        from .console import ConsoleSink
        sinks.append(ConsoleSink(cfg.sinks.console.format))
    if cfg.sinks.jsonl:
        from .jsonl import JsonlSink
        sinks.append(JsonlSink(cfg.sinks.jsonl.path))
    if cfg.mqtt.enabled:
        from ..outbox import Outbox
        from .mqtt import MqttSink
        # without a state dir the outbox lives in memory: alerts still survive broker
        # outages, not restarts
        path = str(Path(cfg.state_dir) / "outbox.sqlite") if cfg.state_dir else ":memory:"
        if cfg.state_dir:
            Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
        sinks.append(MqttSink(cfg, metrics, Outbox(path, metrics=metrics)))
    return sinks
