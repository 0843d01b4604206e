"""Per-stream baselines on disk (agent.state_store): round trip, refusal of bad files,
and a disk that refuses writes (issue: an unwritable state_dir killed the daemon)."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from agent.state_store import StateStore

SHA_A, SHA_B = "a" * 64, "b" * 64
BASIS = {"calibration.quantile": 0.99, "calibration.margin": 1.5, "scoring.normalize": "none"}


def record(mean=(1.0, 2.0), std=(0.5, 0.25), thr=0.3):
    return {"mean": np.array(mean), "std": np.array(std), "threshold": np.float64(thr),
            "samples": 400, "basis": BASIS, "fitted_at": "2024-01-01T00:00:00Z"}


def test_calibration_round_trip(tmp_path):
    store = StateStore(tmp_path)
    assert store.save("pump-1", SHA_A, record())
    p = store.path("pump-1")
    assert p.parent == tmp_path / "calibration" and not list(p.parent.glob("*.tmp"))
    got = StateStore(tmp_path).load("pump-1", SHA_A, 2, BASIS)
    np.testing.assert_array_equal(got["mean"], [1.0, 2.0])
    np.testing.assert_array_equal(got["std"], [0.5, 0.25])
    assert got["threshold"] == 0.3 and got["samples"] == 400 and got["basis"] == BASIS
    assert got["fitted_at"] == "2024-01-01T00:00:00Z"
    assert store.load("pump-2", SHA_A, 2, BASIS) is None
    # saving again replaces the file
    store.save("pump-1", SHA_A, record(thr=0.7))
    assert store.load("pump-1", SHA_A, 2, BASIS)["threshold"] == 0.7


def test_a_baseline_that_did_not_change_is_not_written_again(tmp_path, monkeypatch):
    """Every stream is saved every 5 minutes; a silent one's file came out the same each
    time, written again with two fsyncs (12 writes an hour a stream on an SD card)."""
    import agent.state_store as state_store
    writes = []
    real = state_store.write_json
    monkeypatch.setattr(state_store, "write_json", lambda p, b: (writes.append(p), real(p, b)))
    store = StateStore(tmp_path)
    for _ in range(3):
        assert store.save("pump-1", SHA_A, record())
    assert len(writes) == 1
    assert store.save("pump-1", SHA_A, record(thr=0.7))        # a change is written
    assert len(writes) == 2
    store.forget("pump-1")                                      # and a forgotten file
    assert store.save("pump-1", SHA_A, record(thr=0.7))        # comes back at once
    assert len(writes) == 3 and store.load("pump-1", SHA_A, 2, BASIS)["threshold"] == 0.7


def test_a_state_file_that_cannot_be_written_is_said_once_and_its_recovery_too(tmp_path,
                                                                               caplog):
    """departures.json and shelves.json on a full disk logged a warning at every save (288
    a day) and nothing once the disk took them again."""
    from agent.state_store import FileWriter
    (tmp_path / "state").write_text("a file where the folder should be")
    w = FileWriter(tmp_path / "state" / "departures.json", "last sample times are")
    with caplog.at_level(logging.INFO, logger="agent.state_store"):
        assert not any(w.write({"n": i}) for i in range(5))
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 1 and "cannot be written" in said[0] and "memory only" in said[0]
        (tmp_path / "state").unlink()
        assert w.write({"n": 5}) and w.write({"n": 6})
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and said[1].endswith("departures.json: written again")
    assert json.loads((tmp_path / "state" / "departures.json").read_text()) == {"n": 6}


def test_a_read_only_state_dir_is_said_once_too(tmp_path, caplog, monkeypatch):
    """An SD card remounted read-only: the error names the random temporary file, which
    made every save a new problem."""
    import errno
    import itertools
    import tempfile
    from agent.state_store import FileWriter
    n = itertools.count()

    def refuse(prefix="", suffix="", dir=None):
        raise OSError(errno.EROFS, "Read-only file system", f"{dir}/{prefix}{next(n)}{suffix}")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    w = FileWriter(tmp_path / "shelves.json", "the shelves are")
    with caplog.at_level(logging.WARNING, logger="agent.state_store"):
        assert not any(w.write({"n": i}) for i in range(4))
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "Read-only file system" in said[0], said


def test_calibration_odd_stream_names_do_not_escape(tmp_path):
    store = StateStore(tmp_path)
    for s in ["../evil", "a/b", ".", "x%2Fy", "x/y"]:
        store.save(s, SHA_A, record(thr=len(s) / 10))
    assert {p.parent for p in (tmp_path / "calibration").iterdir()} == {tmp_path / "calibration"}
    assert store.load("x%2Fy", SHA_A, 2, BASIS)["threshold"] == 0.5
    assert store.load("x/y", SHA_A, 2, BASIS)["threshold"] == 0.3


def test_calibration_other_model_means_recalibrate(tmp_path, caplog):
    store = StateStore(tmp_path)
    store.save("s", SHA_A, record())
    caplog.set_level(logging.INFO, logger="agent.state_store")
    assert store.load("s", SHA_B, 2, BASIS) is None
    assert "learning again" in caplog.text
    assert store.load("s", SHA_A, 2, BASIS) is not None


@pytest.mark.parametrize("content", ['{"schema": 1, "mean": [1', "[]", "\xff\xfe",
                                     '{"schema": 1, "model_sha256": "%s", "mean": [1.0, 1], "std": [0.0, 1], "threshold": 1}' % SHA_A,
                                     '{"schema": 1, "model_sha256": "%s", "mean": [1.0, 1], "std": [1e-300, 1], "threshold": 1}' % SHA_A,
                                     '{"schema": 1, "model_sha256": "%s", "mean": [1.0, 1], "std": [1.0, 1], "threshold": -1}' % SHA_A,
                                     '{"schema": 2, "model_sha256": "%s", "mean": [1.0, 1], "std": [1.0, 1], "threshold": 1}' % SHA_A,
                                     # one value per channel or none: 3 would crash the scaler,
                                     # 1 would be broadcast to every channel
                                     '{"schema": 1, "model_sha256": "%s", "mean": [1, 2, 3], "std": [1, 1, 1], "threshold": 1}' % SHA_A,
                                     '{"schema": 1, "model_sha256": "%s", "mean": [1], "std": [1], "threshold": 1}' % SHA_A])
def test_calibration_corrupt_file_is_logged_and_ignored(tmp_path, caplog, content):
    store = StateStore(tmp_path)
    store.save("s", SHA_A, record())
    store.path("s").write_bytes(content.encode("latin-1"))
    caplog.set_level(logging.WARNING, logger="agent.state_store")
    assert store.load("s", SHA_A, 2, BASIS) is None
    assert "learning again" in caplog.text and str(store.path("s")) in caplog.text


def test_calibration_file_is_plain_json(tmp_path):
    store = StateStore(tmp_path)
    store.save("s", SHA_A, record())
    d = json.loads(store.path("s").read_text())
    assert d["schema"] == 1 and d["stream"] == "s" and d["model_sha256"] == SHA_A
    assert d["mean"] == [1.0, 2.0] and d["threshold"] == 0.3


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_refused_save_is_kept_reported_and_retried(tmp_path, caplog):
    store = StateStore(tmp_path)
    (tmp_path / "calibration").mkdir()
    os.chmod(tmp_path / "calibration", 0o500)
    caplog.set_level(logging.ERROR, logger="agent.state_store")
    try:
        assert store.save("s", SHA_A, record()) is False
        assert store.save("t", SHA_A, record()) is False
        h = store.health()
        assert h["ok"] is False and h["unsaved"] == 2 and "calibration" in h["error"]
        assert caplog.text.count("cannot save baselines") == 1   # once per problem
    finally:
        os.chmod(tmp_path / "calibration", 0o700)
    store.retry()
    assert store.health() == {"ok": True, "error": None, "unsaved": 0}
    assert store.load("s", SHA_A, 2, BASIS)["threshold"] == 0.3 and store.load("t", SHA_A, 2, BASIS)


def test_a_save_into_a_file_where_the_folder_should_be_fails_softly(tmp_path):
    # works as root too: a plain file blocks the folder
    (tmp_path / "calibration").write_text("not a folder")
    store = StateStore(tmp_path)
    assert store.save("s", SHA_A, record()) is False
    assert store.health()["ok"] is False
    (tmp_path / "calibration").unlink()
    store.retry()
    assert store.health()["ok"] is True and store.load("s", SHA_A, 2, BASIS) is not None


def test_a_learning_period_from_the_models_policy_is_saved_and_restored(tmp_path):
    """The config leaves detection to the model's policy (as the example does): the baseline
    the policy's learning period fits must still reach state_dir and come back."""
    from agent.config import AgentConfig
    from agent.config_build import build
    from agent.daemon import build_engine
    from agent.detector import Detector
    from agent.metrics import Metrics
    from agent.model_meta import meta_path_for
    from agent.sources.base import Batch
    from onnx_factory import make_model

    path, meta = make_model(tmp_path / "pol.onnx", window=8, channels=["a", "b"],
                            kind="timemix", name="pol")
    meta.policy = {"settings": {"calibration": {"enabled": True, "samples": 40}}}
    meta.save(meta_path_for(path))
    cfg = build(AgentConfig, {
        "node": "t", "state_dir": str(tmp_path / "state"), "model": {"path": str(path)},
        "streams": [{"id": "s", "source": {"type": "serial", "port": "/dev/null"}}],
        "mqtt": {"enabled": False}})
    assert not cfg.calibration.enabled          # not in the file: from the model
    rng = np.random.default_rng(0)
    ts, values = np.arange(60.0) + 1.7e9, rng.normal(size=(60, 2)).astype(np.float32)
    engine = build_engine(cfg, Detector(str(path)), Metrics())
    engine.step([Batch("s", ts, values)])
    assert not engine.streams["s"].baseline.learning
    assert (tmp_path / "state" / "calibration" / "s.json").is_file()
    again = build_engine(cfg, Detector(str(path)), Metrics())
    again.step([Batch("s", ts[:1] + 100, values[:1])])
    assert not again.streams["s"].baseline.learning
    assert again.streams["s"].baseline.threshold == engine.streams["s"].baseline.threshold
