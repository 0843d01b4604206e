"""The source plug-in interface.

A source turns bytes from somewhere (serial line, MQTT, a CSV file) into
`Batch`es of samples for one stream and hands them to `emit`.  It runs in its
own thread (`run` blocks until `stop` is set); the pipeline owns the queue
behind `emit`, which blocks when full so nothing is dropped silently.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Batch:
    stream: str
    ts: np.ndarray       # float64 [n], epoch seconds
    values: np.ndarray   # float32 [n, channels] in MODEL channel order; NaN = missing

    def __len__(self) -> int:
        return len(self.ts)


Emit = Callable[[Batch], None]


class Source(ABC):
    #: registered plug-in name used in config (`source.type`)
    kind: str = ""

    def __init__(self) -> None:
        self.connected = False   # reported per stream in health

    @abstractmethod
    def run(self, emit: Emit, stop: threading.Event) -> None:
        """Produce batches until `stop` is set or the source is exhausted."""

    def close(self) -> None:
        """Release OS resources; called once after `run` returns."""
