"""The source plug-in interface.

Each plug-in is one module of this package: a `Source` subclass and its config class.
The registry (`agent.sources.SOURCES`) and the config's union of source settings are
built from the subclasses found there, as Frigate builds its detectors.

A source turns bytes from somewhere (serial line, MQTT, a CSV file) into
`Batch`es of samples for one stream and hands them to `emit`.  It runs in its
own thread (`run` blocks until `stop` is set); the pipeline owns the queue
behind `emit`, which blocks when full so nothing is dropped silently.

A source whose thread is a network loop that must not fall behind (MQTT) may emit
`Undecoded` messages instead: stamped with their arrival time and queued, nothing
more.  Whoever takes them from the queue turns them into Batches with
`decode_items`, on its own thread and many at once (the source's `decode`): decoding
a tick's messages of one stream together costs less than one at a time, and the
network thread stays free for the network.  A source's decoding then runs on the
consumer's thread only, never on two threads at once.
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
    # monotonic time a live source handed it over: real time, which tells a clock's step
    # forward from a gap (agent/sample_clock.py); None from a file, which has none
    arrived: float | None = None

    def __len__(self) -> int:
        return len(self.ts)


def join(parts: list[Batch]) -> tuple[np.ndarray, np.ndarray, float | None]:
    """One stream's batches as one block: (ts, values, the latest arrival or None)."""
    if len(parts) == 1:
        return parts[0].ts, parts[0].values, parts[0].arrived
    arrived = max((p.arrived for p in parts if p.arrived is not None), default=None)
    return (np.concatenate([p.ts for p in parts]), np.concatenate([p.values for p in parts]),
            arrived)


class Undecoded:
    """One message as received: decoded later by `source.decode` (see the module's rules)."""
    __slots__ = ("source", "topic", "payload", "arrival")

    def __init__(self, source: "Source", topic: str, payload: bytes, arrival: float):
        self.source, self.topic, self.payload, self.arrival = source, topic, payload, arrival


Emit = Callable[["Batch | Undecoded"], None]


def decode_items(items: list) -> list[Batch]:
    """Batches from emitted items, in their order: each run of Undecoded messages from
    one source is decoded at once, by that source."""
    out: list[Batch] = []
    run: list[Undecoded] = []
    for item in items:
        if run and (type(item) is not Undecoded or item.source is not run[0].source):
            out += run[0].source.decode(run)
            run = []
        if type(item) is Undecoded:
            run.append(item)
        else:
            out.append(item)
    if run:
        out += run[0].source.decode(run)
    return out


class Source(ABC):
    """A source plug-in declares its `type` (the config's `source.type`), its
    `config_class` (a `config_base.SourceConfig` with `tag=` that type), and how it is
    built from them."""
    config_class: ClassVar[type]
    type: ClassVar[str]
    # whether the pipeline starts it again after it fails: a live feed can resume
    # where it is, a recording would repeat its rows
    restarts: ClassVar[bool] = True

    def __init__(self) -> None:
        self.connected = False   # reported per stream in health
        # connections lost (a serial adapter unplugged, the broker gone): a gauge alone,
        # scraped every 15 s, misses a source that flaps every 2 s
        self.disconnects = 0

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

    def decode(self, items: list[Undecoded]) -> list[Batch]:
        """Its own Undecoded messages, in order, as Batches (sources that emit them)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release OS resources; called once after `run` returns."""
