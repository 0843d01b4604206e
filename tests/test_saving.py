"""agent.saving: learned baselines reach the disk a few at a time, after engine steps, so
a learning period that many streams end together (or the periodic save) never holds a
step up for hundreds of files; a clean stop still saves them all at once."""
from __future__ import annotations

import numpy as np
import pytest

import agent.saving as saving
from agent.config import DetectionConfig
from agent.config_build import build
from agent.detector import Detector
from agent.engine import Engine
from agent.policy import baseline_basis
from agent.saving import SaveQueue
from agent.sources.base import Batch
from agent.state_store import StateStore
from onnx_factory import make_model

N = 5


def test_the_queue_saves_new_baselines_first_each_once_within_its_budget():
    q, saved = SaveQueue(), []
    q.due_all(["a", "b", "c"])
    q.due("c", first=True)
    q.due("d", first=True)
    q.due("a")
    assert len(q) == 5
    assert q.run(saved.append, budget_s=0) == 1          # at least one, even out of time
    assert saved == ["c"]
    assert q.run(saved.append, budget_s=60) == 3
    assert saved == ["c", "d", "a", "b"]                 # c saved once; new ones first
    assert q.run(saved.append) == 0 and len(q) == 0
    q.due_all(["x"])
    q.clear()
    assert q.run(saved.append) == 0


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = make_model(tmp_path_factory.mktemp("m") / "m.onnx", window=8, channels=["a", "b"],
                         kind="timemix", name="m")
    return str(path)


def engine(model, tmp_path) -> Engine:
    cfg = build(DetectionConfig, {"node": "t", "calibration": {"enabled": True, "samples": 40}})
    return Engine(cfg, Detector(model), store=StateStore(tmp_path), default_max_streams=N)


def step(e: Engine, k: int, n: int = 1) -> None:
    rng = np.random.default_rng(k)
    ts = 1.7e9 + np.arange(k, k + n, dtype=np.float64)
    e.step([Batch(f"s{i}", ts, rng.normal(size=(n, 2)).astype(np.float32), source=f"s{i}")
            for i in range(N)])


def saved(tmp_path) -> int:
    return len(list((tmp_path / "calibration").glob("*.json")))


def test_streams_that_learn_together_are_saved_a_few_steps_apart(model, tmp_path, monkeypatch):
    monkeypatch.setattr(saving, "SAVE_BUDGET_S", 0.0)      # one file a step
    e = engine(model, tmp_path)
    step(e, 0, 40)                      # every stream ends its learning period here
    assert all(not st.baseline.learning for st in e.streams.values())
    assert saved(tmp_path) == 1
    for k in range(N - 1):
        step(e, 40 + k)
        assert saved(tmp_path) == 2 + k
    e.streams["s0"].baseline.threshold = 123.0
    e.saves.due_all(e.streams)
    e.drop("s1")                        # gone by its turn: skipped
    assert e.saves.run(e.save) == 1     # as the pipeline runs it between steps
    basis = baseline_basis(e.cfg, e.meta)
    assert e.store.load("s0", e.meta.onnx_sha256, 2, basis)["threshold"] == 123.0
    assert e.saves.run(e.save) == 1 and len(e.saves) == N - 2     # s1: nothing to write


def test_save_baselines_writes_every_stream_at_once(model, tmp_path, monkeypatch):
    monkeypatch.setattr(saving, "SAVE_BUDGET_S", 0.0)
    e = engine(model, tmp_path)
    step(e, 0, 40)
    assert saved(tmp_path) == 1
    e.save_baselines()                  # a clean stop
    assert saved(tmp_path) == N and len(e.saves) == 0
