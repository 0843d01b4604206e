"""Source plug-ins, chosen by `source.type` in each stream's configuration.

Every module of this package is imported here, so a new source is one new file with
a `Source` subclass; the registry is built from the subclasses, sorted by type.
"""
from __future__ import annotations

import importlib
import pkgutil

from ..config_base import Strict
from ..metrics import Metrics
from .base import Batch, Emit, Source

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

SOURCES: dict[str, type[Source]] = {
    cls.type: cls for cls in sorted(Source.__subclasses__(), key=lambda c: c.type)}


def build_source(stream, channels: list[str], metrics: Metrics, broker, node: str) -> Source:
    """The configured source for one stream (`stream`: a StreamConfig)."""
    cfg: Strict = stream.source
    return SOURCES[cfg.type].from_config(stream.id, cfg, channels, metrics, broker, node)


__all__ = ["Batch", "Emit", "Source", "SOURCES", "build_source"]
