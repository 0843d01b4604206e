"""The source plug-in interface.

Each plug-in is one module of this package: a `Source` subclass and its config class.
The registry (`agent.sources.SOURCES`) and the config's union of source settings are
built from the subclasses found there, as Frigate builds its detectors.

A source turns bytes from somewhere (serial line, MQTT, a CSV file) into
`Batch`es of samples for one stream and hands them to `emit`.  It runs in its
own thread (`run` blocks until `stop` is set); the pipeline owns the queue
behind `emit`, which blocks when full so nothing is dropped silently.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np


@dataclass
class Batch:
    stream: str
    ts: np.ndarray       # float64 [n], epoch seconds
    values: np.ndarray   # float32 [n, channels] in MODEL channel order; NaN = missing
    source: str | None = None    # the configured stream id of the source, when it differs

    def __len__(self) -> int:
        return len(self.ts)


Emit = Callable[[Batch], None]


class Source(ABC):
    """A source plug-in declares its `type` (the config's `source.type`), its pydantic
    `config_class` (with `type: Literal[...]`), and how it is built from them."""
    config_class: ClassVar[type]
    type: ClassVar[str]

    def __init__(self) -> None:
        self.connected = False   # reported per stream in health

    @classmethod
    def from_config(cls, stream_id: str, cfg, channels: list[str], metrics,
                    broker, node: str) -> "Source":
        """The source for one configured stream; `broker` (the `mqtt:` section) and `node`
        matter only to sources that connect to the broker.  Raises ValueError/OSError on
        an unusable setup (e.g. a replay file without a model channel)."""
        return cls(stream_id, cfg, channels, metrics)

    @abstractmethod
    def run(self, emit: Emit, stop: threading.Event) -> None:
        """Produce batches until `stop` is set or the source is exhausted."""

    def close(self) -> None:
        """Release OS resources; called once after `run` returns."""
