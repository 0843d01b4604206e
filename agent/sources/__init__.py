"""Source plug-ins, chosen by `source.type` in each stream's configuration."""
from __future__ import annotations

from ..config import MqttConfig, StreamConfig
from ..metrics import Metrics
from .base import Batch, Emit, Source
from .mqtt import MqttLineSource
from .replay import ReplayFileSource
from .serial import SerialLineSource

SOURCES: dict[str, type[Source]] = {
    cls.kind: cls for cls in (SerialLineSource, MqttLineSource, ReplayFileSource)
}


def build_source(stream: StreamConfig, channels: list[str], metrics: Metrics,
                 mqtt: MqttConfig, node: str) -> Source:
    """The configured source for one stream; raises ValueError/OSError on an unusable
    setup (e.g. a replay file without a model channel) so it fails at startup."""
    cfg = stream.source
    if cfg.type == "mqtt":
        return MqttLineSource(stream.id, cfg, channels, metrics, mqtt, node)
    if cfg.type not in SOURCES:
        raise ValueError(f"stream {stream.id!r}: unknown source type {cfg.type!r} "
                         f"(known: {', '.join(sorted(SOURCES))})")
    return SOURCES[cfg.type](stream.id, cfg, channels, metrics)


__all__ = ["Batch", "Emit", "Source", "SOURCES", "build_source"]
