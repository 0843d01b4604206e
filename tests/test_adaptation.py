"""Adaptation (agent/adaptation.py), standing alerts and re-baselining, with a real ONNX
model: recon = 0.9 x + 0.01 in scaled space, so a sample's error grows with how far
it sits from the stream's (adapted) mean: a drift the baseline follows stays quiet, a
change faster than it shows up."""
from __future__ import annotations

import numpy as np
import pytest

from agent.adaptation import EPOCH
from agent.config import DetectionConfig
from agent.config_build import build
from agent.detector import Detector
from agent.engine import Engine
from agent.jobs import CHUNK, Recording, file_config, replay_config, run_table, step_bounds
from agent.sources.base import Batch
from onnx_factory import make_model

CH = ["a", "b", "c"]
LEARN = 300
HZ = 1.0


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = make_model(tmp_path_factory.mktemp("m") / "affine.onnx", window=8, channels=CH)
    return str(path)


def engine(model: str, **over) -> Engine:
    d = {"node": "t", "calibration": {"enabled": True, "samples": LEARN, "margin": 3.0},
         "adaptation": {"enabled": True, "time_constant_s": 600}, **over}
    return Engine(build(DetectionConfig, d), Detector(model))


def series(n: int, level: np.ndarray | float = 0.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (10.0 + np.asarray(level, float)[..., None] * np.ones(3)
            + rng.normal(0, 1.0, (n, 3))).astype(np.float32)


def run(e: Engine, values: np.ndarray, t0: float = 1.7e9, block: int = 100) -> Recording:
    rec = Recording()
    ts = t0 + np.arange(len(values)) / HZ
    for a in range(0, len(values), block):
        rec.add(e.step([Batch("s", ts[a:a + block], values[a:a + block])]))
    return rec


def alerts(rec: Recording) -> list[dict]:
    return [ev for ev in rec.events if ev["type"] == "new"]


def open_share(rec: Recording, stream: str = "s") -> float:
    return float(rec.table(stream)["alert"].mean())


# A rise of 8 stds: over 6 hours (1.9 std/h, normal drift) or over 10 minutes (a fault).
RISE = 8.0


def drift(hours: float) -> np.ndarray:
    n = int(hours * 3600 * HZ)
    return np.concatenate([np.zeros(LEARN), np.linspace(0, RISE, n), np.full(1200, RISE)])


def test_a_slow_normal_drift_is_followed(model):
    level = drift(6)
    e = engine(model)
    rec = run(e, series(len(level), level))
    assert alerts(rec) == [] and open_share(rec) == 0.0
    shift = e.streams["s"].adapter.shift()
    assert np.all(shift > 0.9 * RISE), shift          # the mean followed the plant
    # without adaptation the same drift is one standing alarm: the test can fail
    frozen = run(engine(model, adaptation={"enabled": False}), series(len(level), level))
    assert open_share(frozen) > 0.5


def test_a_ramp_fault_of_the_same_size_is_not_absorbed(model):
    level = drift(10 / 60)
    e = engine(model)
    rec = run(e, series(len(level), level))
    new = alerts(rec)
    assert len(new) == 1, [a["start"] for a in new]
    t = rec.table("s")
    first = t["ts"][np.argmax(t["alert"] == 1)] - 1.7e9
    assert LEARN < first < LEARN + 600                   # during the ramp
    assert rec.events[-1]["type"] != "end"               # still open at the new level
    assert np.all(np.abs(e.streams["s"].adapter.shift()) < 2.0)   # the fault was not learned


def test_blocks_or_one_by_one_give_the_same_scores(model):
    """The adapted scaler changes only between epochs, so chunking cannot change a score."""
    level = drift(0.5)
    vals = series(len(level), level, seed=3)
    a = run(engine(model), vals, block=1)
    b = run(engine(model), vals, block=256)
    np.testing.assert_array_equal(a.table("s")["score"], b.table("s")["score"])
    assert len(a.table("s")["score"]) > 4 * EPOCH


def test_a_file_job_scores_as_one_by_one_and_steps_on_epochs_after_learning(model):
    """jobs.run_table (evaluate, replay, predict) restarts its chunks where the learning
    period ends, so each later step starts on an adaptation epoch; the scores are those of
    a daemon fed one sample at a time."""
    level = drift(0.5)
    vals = series(len(level), level, seed=4)
    ts = 1.7e9 + np.arange(len(vals)) / HZ
    a = run(engine(model), vals, block=1)
    b = run_table(engine(model), "s", ts, vals)
    for key in ("score", "alert"):
        np.testing.assert_array_equal(a.table("s")[key], b.table("s")[key])
    bounds = step_bounds(len(vals), LEARN, CHUNK)
    assert (0, min(CHUNK, LEARN)) == bounds[0] and bounds[-1][1] == len(vals)
    assert all(b0 == a1 for (_, a1), (b0, _) in zip(bounds, bounds[1:]))
    after = [b0 for b0, _ in bounds if b0 >= LEARN]
    assert after[0] == LEARN and all((b0 - LEARN) % EPOCH == 0 for b0 in after)


def test_a_standing_alert_re_baselines_when_asked(model):
    """A new steady level (a set point changed without telling the agent): the alert turns
    standing once its score settles; with rebaseline_after_s the stream learns again."""
    level = np.concatenate([np.zeros(LEARN + 200), np.full(3000, RISE)])
    over = {"alerts": {"standing_after_s": 120, "rebaseline_after_s": 300, "close_m": 10}}
    e = engine(model, **over)
    rec = run(e, series(len(level), level))
    kinds = [(ev["type"], ev.get("reason"), ev["standing"]) for ev in rec.events
             if ev["type"] != "update" or ev["standing"]]
    assert kinds[0] == ("new", None, False)
    assert ("update", None, True) in kinds
    assert ("end", "rebaseline", True) in kinds
    end = next(i for i, k in enumerate(kinds) if k[0] == "end")
    assert all(k[0] != "new" for k in kinds[end:]), "learned the new level, no new alert"
    assert e.streams["s"].state == "normal"
    # off by default: the alert stays open, standing
    stays = run(engine(model, alerts={"standing_after_s": 120}), series(len(level), level))
    assert [ev["type"] for ev in stays.events if ev["type"] != "update"] == ["new"]
    assert stays.events[-1]["standing"] is True


def test_a_long_chunk_re_baselines_where_one_epoch_per_ingest_does(model, monkeypatch):
    """An ingest may hold several epochs, but the engine re-baselines between ingests:
    with rebaseline_after_s a stream still takes one epoch per ingest, so 1000-sample
    chunks end the alert and learn again at the sample one epoch per ingest gives."""
    from agent import adaptation
    level = np.concatenate([np.zeros(LEARN + 200), np.full(3000, RISE)])
    vals = series(len(level), level)
    # due inside the first two epochs of a 3-epoch ingest (300 s: inside its last one)
    over = {"alerts": {"standing_after_s": 120, "rebaseline_after_s": 340, "close_m": 10}}

    def events():
        rec = run(engine(model, **over), vals, block=1000)
        return [(ev["type"], ev.get("reason"), ev["start"], ev["end"]) for ev in rec.events]

    got = events()
    one = adaptation.Adapter.room

    def one_epoch(self):        # one epoch per ingest (max_batch is 64 here)
        if self.ingested // EPOCH - adaptation.LAG > self.version:
            return 0
        return min(one(self), EPOCH - self.ingested % EPOCH)

    monkeypatch.setattr(adaptation.Adapter, "room", one_epoch)
    assert ("end", "rebaseline") in [e[:2] for e in got]
    assert got == events()


def test_a_long_drifting_normal_replay_stays_quiet(model, tmp_path):
    """Two days of a sensor that wanders (a daily cycle of 6 stds and a slow trend), replayed
    like `tsad-agent replay`: alerts open on at most 1 % of rows."""
    import pandas as pd
    n = 2 * 24 * 3600 // 10                      # a sample every 10 s
    t = np.arange(n) * 10.0
    level = 3.0 * np.sin(2 * np.pi * t / 86400) + t / 86400
    f = tmp_path / "long.csv"
    v = series(n, level, seed=5)
    pd.DataFrame({"timestamp": 1.7e9 + t, **{c: v[:, i] for i, c in enumerate(CH)}}).to_csv(f, index=False)
    cfg = file_config(f, model, LEARN, {"adaptation": {"enabled": True, "time_constant_s": 3600},
                                        "calibration": {"margin": 3.0}})
    _, rec = replay_config(cfg, Detector(model))
    assert open_share(rec, "replay") <= 0.01, open_share(rec, "replay")
    cfg = file_config(f, model, LEARN, {"calibration": {"margin": 3.0}})
    _, frozen = replay_config(cfg, Detector(model))
    assert open_share(frozen, "replay") > 0.05


def test_versions_in_use_keep_their_values_while_newer_epochs_end():
    """A version (scaler and error level) still in use scales and carries its level as when
    it was made, until LAG newer ones exist, and the learned scaler is never touched."""
    from types import SimpleNamespace

    from agent.adaptation import LAG, Adapter
    from agent.config import AdaptationConfig
    from agent.contract import StreamScaler

    ad = Adapter(AdaptationConfig(enabled=True, time_constant_s=60),
                 StreamScaler(np.zeros(3), np.ones(3)), SimpleNamespace(interval=1.0),
                 level=np.ones(3))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    made = {}

    def record():
        s, lv = ad.at(ad.version)
        made[ad.version] = (s.apply(x).tobytes(), lv.copy())

    record()
    ok = np.ones((EPOCH, 1), bool)
    for e in range(1, 3 * (LAG + 1) + 2):
        raw = np.full((EPOCH, 3), 0.5 * e, np.float32)
        ad.observe(raw, ok, np.full((EPOCH, 3), 1.0 + e, np.float32))
        assert ad.version == e
        record()
        # each epoch moved the mean and the level
        assert made[e][0] != made[e - 1][0] and not np.array_equal(made[e][1], made[e - 1][1])
        for v in range(max(e - LAG, 0), e + 1):
            s, lv = ad.at(v)
            assert s.apply(x).tobytes() == made[v][0] and np.array_equal(lv, made[v][1]), v
    assert np.array_equal(ad.learned.mean, np.zeros(3))


@pytest.mark.parametrize("fall", [1.0, 2.0, 4.0])
def test_a_typical_error_falls_faster_than_it_rises(fall):
    """adaptation.level_fall: an epoch whose errors are higher moves the level by the
    EWMA weight of its samples, one whose errors are lower by that of `fall` times as many;
    the scaler mean follows as before."""
    from types import SimpleNamespace

    from agent.adaptation import Adapter
    from agent.config import AdaptationConfig
    from agent.contract import StreamScaler

    tc = 600.0
    ad = Adapter(AdaptationConfig(enabled=True, time_constant_s=tc, level_fall=fall),
                 StreamScaler(np.zeros(2), np.ones(2)), SimpleNamespace(interval=1.0),
                 level=np.ones(2))
    ok = np.ones((EPOCH, 1), bool)
    up = 1.0 - np.exp(-EPOCH / tc)
    ad.observe(np.full((EPOCH, 2), 0.5, np.float32), ok, np.full((EPOCH, 2), 5.0, np.float32))
    high = 1.0 + up * (5.0 - 1.0)
    np.testing.assert_allclose(ad.level, high, rtol=1e-12)
    ad.observe(np.full((EPOCH, 2), 0.5, np.float32), ok, np.full((EPOCH, 2), 1.0, np.float32))
    down = 1.0 - np.exp(-fall * EPOCH / tc)
    np.testing.assert_allclose(ad.level, high + down * (1.0 - high), rtol=1e-12)
    # the mean is not a level: it moves by the same weight up or down
    np.testing.assert_allclose(ad.scaler.mean, 0.5 * (1 - (1 - up) ** 2), rtol=1e-12)


def test_max_shift_bounds_the_mean_and_not_the_level():
    """adaptation.max_shift: the mean stops at learned mean + max_shift x learned std
    however far the values lead it; the typical error is not a mean and is not bounded."""
    from types import SimpleNamespace

    from agent.adaptation import Adapter
    from agent.config import AdaptationConfig
    from agent.contract import StreamScaler

    ad = Adapter(AdaptationConfig(enabled=True, time_constant_s=60.0, gate=1e9, max_shift=0.5),
                 StreamScaler(np.array([1.0, -1.0]), np.array([2.0, 4.0])),
                 SimpleNamespace(interval=1.0), level=np.ones(2))
    ok = np.ones((EPOCH, 1), bool)
    for _ in range(20):
        ad.observe(np.full((EPOCH, 2), 100.0, np.float32), ok, np.full((EPOCH, 2), 9.0, np.float32))
    assert ad.scaler.mean.tolist() == [1.0 + 0.5 * 2.0, -1.0 + 0.5 * 4.0]
    assert ad.level.tolist() > [8.9, 8.9]


def test_a_channel_without_values_keeps_its_mean_and_level_while_the_others_move():
    """An epoch in which one channel's values are all missing: that channel's mean and level
    stay, the other levels fall by level_fall times the weight, the other means move by the
    plain one."""
    from types import SimpleNamespace

    from agent.adaptation import Adapter
    from agent.config import AdaptationConfig
    from agent.contract import StreamScaler

    tc, fall = 600.0, 3.0
    ad = Adapter(AdaptationConfig(enabled=True, time_constant_s=tc, level_fall=fall),
                 StreamScaler(np.zeros(3), np.ones(3)), SimpleNamespace(interval=1.0),
                 level=np.full(3, 2.0))
    raw = np.full((EPOCH, 3), 0.25, np.float32)
    raw[:, 1] = np.nan
    ad.observe(raw, np.ones((EPOCH, 1), bool), np.full((EPOCH, 3), 0.5, np.float32))
    down, up = 1.0 - np.exp(-fall * EPOCH / tc), 1.0 - np.exp(-EPOCH / tc)
    fell = 2.0 + down * (0.5 - 2.0)
    np.testing.assert_allclose(ad.level, [fell, 2.0, fell], rtol=1e-12)
    np.testing.assert_allclose(ad.scaler.mean, [0.25 * up, 0.0, 0.25 * up], rtol=1e-12)


def test_channel_levels_keep_scores_chunk_independent(model):
    """With per-channel levels rising through a fault and falling after it (level_fall) and
    smoothed scores, a daemon fed one sample at a time and 256-row blocks compute the same
    scores, bit for bit."""
    level = np.concatenate([np.zeros(LEARN + 400), np.full(300, 6.0), np.zeros(900)])
    vals = series(len(level), level, seed=5)
    vals[:, 1] = series(len(level), 0.0, seed=6)[:, 1]      # one channel stays normal
    over = {"scoring": {"normalize": "channel", "smoothing": 5}}
    e1 = engine(model, **over)
    a = run(e1, vals, block=1)
    b = run(engine(model, **over), vals, block=256)
    for key in ("score", "alert"):
        np.testing.assert_array_equal(a.table("s")[key], b.table("s")[key])
    assert alerts(a), "the fault must raise an alert for the levels to fall after it"
    assert e1.streams["s"].adapter.version > 10


def test_a_jittered_stream_learns_the_same_pace_however_chunked(model):
    """Without interval_s a stream learns its sampling interval from its first steps (the
    median of the first PACE_STEPS): one sample at a time or in blocks, the same one, so
    adaptation's time constant and every score are the same."""
    vals = series(LEARN + 1200, 0.0, seed=12)
    rng = np.random.default_rng(13)
    ts = 1.7e9 + np.arange(len(vals)) + rng.uniform(-0.3, 0.3, len(vals))
    recs, engines = [], []
    for block in (1, 257):
        e = engine(model)
        rec = Recording()
        for a in range(0, len(vals), block):
            rec.add(e.step([Batch("s", ts[a:a + block], vals[a:a + block])]))
        recs.append(rec)
        engines.append(e)
    assert engines[0].streams["s"].pace.interval == engines[1].streams["s"].pace.interval
    np.testing.assert_array_equal(recs[0].table("s")["score"], recs[1].table("s")["score"])
