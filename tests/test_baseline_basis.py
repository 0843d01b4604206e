"""A saved baseline is restored only under the settings it was learned with (upgrade audit,
F1): the model's policy refitted (`fit-policy --write`, the .onnx untouched), a config key
that changes how scores are computed or fitted, or a file from before the settings were
saved, and the stream learns again with one log line naming what changed; a setting that
only acts from the restore on (adaptation, alerts, eviction) keeps the baseline."""
from __future__ import annotations

import json
import logging
import signal

import numpy as np
import pytest

import agent_harness
from agent_harness import MOSQUITTO, STREAM, assert_exact, no_traceback
from agent.config import DetectionConfig
from agent.config_build import build
from agent.detector import Detector
from agent.engine import Engine
from agent.policy_store import write_policy
from agent.sources.base import Batch
from agent.state_store import StateStore, basis_change
from onnx_factory import make_model

CH = ["a", "b", "c"]
LEARN = 200


@pytest.fixture
def model(tmp_path):
    path, _ = make_model(tmp_path / "m.onnx", window=16, channels=CH, kind="timemix")
    return str(path)


def engine(model: str, tmp_path, **over) -> Engine:
    cfg = build(DetectionConfig, {"node": "t", **over,
                                  "calibration": {"enabled": True, "samples": LEARN,
                                                  **over.get("calibration", {})}})
    return Engine(cfg, Detector(model), store=StateStore(tmp_path / "state"))


def feed(e: Engine, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None]
    values = (np.sin(t / 5.0 + np.arange(3)) + rng.normal(0, 0.05, (n, 3))).astype(np.float32)
    for i in range(0, n, 64):
        v = values[i:i + 64]
        e.step([Batch("s", 1e9 + np.arange(i, i + len(v), dtype=np.float64), v)])


def saved(tmp_path) -> dict:
    return json.loads((tmp_path / "state" / "calibration" / "s.json").read_text())


def test_a_refitted_policy_margin_is_not_restored_and_the_stream_learns_again(
        model, tmp_path, caplog):
    write_policy(model, {"settings": {"calibration": {"margin": 3.0}}})
    e = engine(model, tmp_path)
    feed(e, LEARN + 50)
    first = e.streams["s"].threshold
    e.save_baselines()
    assert saved(tmp_path)["basis"]["calibration.margin"] == 3.0
    write_policy(model, {"settings": {"calibration": {"margin": 1.0}}})   # as fit-policy --write
    caplog.set_level(logging.INFO)
    e2 = engine(model, tmp_path)
    feed(e2, 10)
    assert e2.streams["s"].baseline.learning
    assert caplog.text.count("learning again") == 1 and "baseline restored" not in caplog.text
    assert "was learned with calibration.margin 3.0 (now 1.0); learning again" in caplog.text
    e2.drop("s")                            # the same samples learned afresh
    feed(e2, LEARN + 50)
    assert e2.streams["s"].threshold == pytest.approx(first / 3.0)
    e2.save_baselines()
    assert saved(tmp_path)["basis"]["calibration.margin"] == 1.0


def test_a_config_normalize_override_is_not_restored(model, tmp_path, caplog):
    e = engine(model, tmp_path)
    feed(e, LEARN + 50)
    e.save_baselines()
    caplog.set_level(logging.WARNING)
    e2 = engine(model, tmp_path, scoring={"normalize": "channel"})
    feed(e2, 10)
    assert e2.streams["s"].baseline.learning
    assert 'was learned with scoring.normalize "none" (now "channel")' in caplog.text


@pytest.mark.parametrize("later", [
    {"adaptation": {"enabled": True, "time_constant_s": 600.0}},
    {"alerts": {"open_k": 2, "close_m": 3}},
    {"buffer": {"idle_evict_s": 10.0, "ffill_max": 1}},
    {"calibration": {"refine": {"after_s": 10.0}}},
], ids=["adaptation", "alerts", "eviction", "refine"])
def test_a_setting_that_acts_only_after_the_restore_keeps_the_baseline(model, tmp_path, caplog,
                                                                      later):
    e = engine(model, tmp_path)
    feed(e, LEARN + 50)
    e.save_baselines()
    caplog.set_level(logging.INFO)
    e2 = engine(model, tmp_path, **later)
    feed(e2, 10)
    assert not e2.streams["s"].baseline.learning
    assert e2.streams["s"].threshold == e.streams["s"].threshold
    assert "baseline restored" in caplog.text and "learning again" not in caplog.text


def test_a_file_saved_before_the_basis_was_is_learned_again(model, tmp_path, caplog):
    """Its saved quantile and margin cannot vouch for normalize or smoothing."""
    e = engine(model, tmp_path)
    feed(e, LEARN + 50)
    e.save_baselines()
    d = saved(tmp_path)
    d.pop("basis")
    d.update(quantile=0.99, margin=0.5)     # what tsad-agent 0.1.0 wrote
    (tmp_path / "state" / "calibration" / "s.json").write_text(json.dumps(d))
    caplog.set_level(logging.WARNING)
    e2 = engine(model, tmp_path)
    feed(e2, 10)
    assert e2.streams["s"].baseline.learning
    assert ("was saved without the settings it was learned under (tsad-agent before 0.2.0)"
            in caplog.text)


def test_basis_change_names_each_difference_and_ignores_keys_it_does_not_know():
    now = {"scoring.smoothing": 10, "calibration.margin": 2.0, "scoring.level_band": None}
    assert basis_change(dict(now), now) is None
    assert basis_change({**now, "a.later.key": 1}, now) is None       # a rollback's file
    old = {"scoring.smoothing": 1, "calibration.margin": 2.0}
    assert basis_change(old, now) == ("was learned with scoring.smoothing 1 (now 10), "
                                      "scoring.level_band unrecorded (now null)")


# ---------------------------------------------------------------- the real agent
needs_broker = pytest.mark.skipif(not agent_harness.os.path.exists(MOSQUITTO),
                                  reason="mosquitto not installed")
REAL_LEARN = 50


@needs_broker
@pytest.mark.parametrize("policy, kept", [
    ({"calibration": {"margin": 2.0}}, False),           # fit-policy --write, .onnx untouched
    ({"adaptation": {"enabled": True, "time_constant_s": 60.0}}, True),
], ids=["margin-refitted", "adaptation-only"])
def test_the_real_agent_relearns_after_a_policy_refit_and_keeps_it_otherwise(
        tmp_path, policy, kept):
    r = agent_harness.Rig(tmp_path, calibration={"enabled": True, "samples": REAL_LEARN})
    try:
        agent = r.agent()
        w = r.writer
        w.normal(REAL_LEARN)
        agent.wait_log("learned its baseline on 50 samples")
        agent.signal(signal.SIGTERM)                     # a clean stop saves it
        assert agent.proc.wait(30) == 0, agent.log()
        path = r.state / "calibration" / f"{STREAM}.json"
        assert json.loads(path.read_text())["basis"]["calibration.margin"] == 0.5
        write_policy(str(r.model), {"settings": policy})
        agent = r.agent()                                # its log: this process's only
        w.normal(REAL_LEARN + 20)
        if kept:
            agent.wait_log("baseline restored")
            assert agent.count("learning again") == 0 and agent.count("learned its baseline") == 0
        else:
            agent.wait_log("learned its baseline on 50 samples")
            assert agent.count("was learned with calibration.margin 0.5 (now 2.0); "
                               "learning again") == 1, agent.log()
            assert agent.count("baseline restored") == 0
            agent_harness.wait_until(
                lambda: json.loads(path.read_text())["basis"]["calibration.margin"] == 2.0,
                "the new baseline saved")
        expected = set(w.spikes(3))                      # detection goes on either way
        r.obs.wait_ids(expected)
        assert_exact(r.obs, expected)
        agent.signal(signal.SIGTERM)
        assert agent.proc.wait(30) == 0, agent.log()
        no_traceback(agent)
    finally:
        r.close()
