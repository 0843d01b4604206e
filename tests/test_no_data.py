"""A channel without a value (audit s20 F2): every window left unscored counts in the
process-wide `windows_skipped` (health, Prometheus).  Engine level, one sample a step as
the daemon gets them."""
from __future__ import annotations

import numpy as np
import pytest

from agent.config import AgentConfig, DetectionConfig
from agent.config_build import build
from agent.detector import Detector
from agent.engine import Engine
from agent.health import health_snapshot
from agent.metrics import Metrics
from agent.prom import shared_families
from agent.sources.base import Batch
from onnx_factory import make_model

CH = ["a", "b", "c"]
W, FILL = 8, 3                  # the model's window, buffer.ffill_max
GONE = FILL + W                 # missing samples in a row that make a channel gone
NORMAL = [0.0, 0.0, 0.0]


@pytest.fixture
def engine(tmp_path):
    """recon = 0.9 x + 0.01: zeros score 1e-4, huge values ~1e4 against a threshold of 1;
    no learning period, one window opens an alert and two close it."""
    path, _ = make_model(tmp_path / "m.onnx", window=W, channels=CH)
    m = Metrics()
    cfg = build(DetectionConfig, {"node": "t", "calibration": {"enabled": False},
                                  "scoring": {"threshold": 1.0},
                                  "buffer": {"ffill_max": FILL},
                                  "alerts": {"open_k": 1, "open_n": 1, "close_m": 2}})
    return Engine(cfg, Detector(str(path), metrics=m), metrics=m)


class Feed:
    """One sample a step to stream "s"; remembers the states entered."""

    def __init__(self, e: Engine):
        self.e, self.i, self.states = e, 0, []

    def __call__(self, n: int, row=NORMAL, without: str | None = None) -> None:
        v = np.array(row, np.float32)
        if without is not None:
            v[CH.index(without)] = np.nan
        for _ in range(n):
            for r in self.e.step([Batch("s", np.array([1e9 + self.i]), v[None])]):
                self.states += r.entered
            self.i += 1

    @property
    def st(self):
        return self.e.streams["s"]


def test_every_dropped_window_counts_in_the_process_counter(engine, tmp_path):
    feed = Feed(engine)
    feed(W)
    feed(GONE + 4, without="b")
    feed(W)
    other = engine.stream("t")
    v = np.zeros((40, 3), np.float32)
    v[10:20, 2] = np.nan
    engine.step([Batch("t", 2e9 + np.arange(40.0), v)])     # a block, as a file job's
    rings = feed.st.ring.skipped + other.ring.skipped
    assert feed.st.ring.skipped == GONE + 4 - FILL + W - 1 and other.ring.skipped > 0
    assert engine.metrics.windows_skipped == rings
    assert engine.metrics.snapshot()["windows_skipped"] == rings
    (fam,) = [f for f in shared_families(engine.metrics, None, None)
              if f.name == "tsad_windows_skipped"]
    assert fam.samples[0].value == rings
    cfg = build(AgentConfig, {"node": "t", "model": {"path": "m.onnx"}, "mqtt": {"enabled": False},
                              "streams": [{"id": "s", "source": {"type": "replay", "path": "x"}}]})
    assert health_snapshot(cfg, engine, [])["windows_skipped"] == rings
