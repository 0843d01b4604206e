"""Builds the sinks a config asks for."""
from __future__ import annotations

from ..config import AgentConfig
from ..metrics import Metrics
from .base import Sink
from .console import ConsoleSink
from .jsonl import JsonLinesSink
from .mqtt import MqttSink


def build_sinks(cfg: AgentConfig, metrics: Metrics) -> list[Sink]:
    sinks: list[Sink] = []
    if cfg.sinks.console.enabled:
        sinks.append(ConsoleSink(cfg.sinks.console.format))
    if cfg.sinks.jsonl:
        sinks.append(JsonLinesSink(cfg.sinks.jsonl.path, metrics=metrics))
    if cfg.mqtt.enabled:
        sinks.append(MqttSink(cfg, metrics))
    return sinks
