"""Sink plug-ins: where results go (console, JSON lines, MQTT).

Every module of this package is imported here, so a new sink is one new file with a
`Sink` subclass; the registry is built from the subclasses, sorted by class name.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import Sink

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

SINKS: dict[str, type[Sink]] = {
    (cls.key or cls.__name__): cls
    for cls in sorted(Sink.__subclasses__(), key=lambda c: c.__name__)}


def build_sinks(cfg, metrics) -> list[Sink]:
    """The sinks an AgentConfig enables, in registry order."""
    return [s for s in (cls.from_config(cfg, metrics) for cls in SINKS.values()) if s is not None]


__all__ = ["SINKS", "Sink", "build_sinks"]
