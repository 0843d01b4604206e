"""The engine (agent.engine): learning, alerts, batching, bounds and isolation, with a
real ONNX model and no threads."""
from __future__ import annotations

import logging
import time
import types

import numpy as np
import pytest

from agent.config import DetectionConfig
from agent.config_build import build
from agent.detector import Detector
from agent.engine import Engine
from agent.health import stream_status
from agent.metrics import Metrics
from agent.sources.base import Batch
from agent.state_store import StateStore
from agent.timestamps import iso_utc
from onnx_factory import make_model

CH = ["a", "b", "c"]
W = 16


@pytest.fixture
def model(tmp_path):
    path, _ = make_model(tmp_path / "m.onnx", window=W, channels=CH, kind="timemix")
    return str(path)


def engine_for(model: str, store=None, max_batch: int = 256, metrics=None, **over) -> Engine:
    m = metrics or Metrics()
    det = Detector(model, metrics=m, max_batch=max_batch)
    return Engine(build(DetectionConfig, {"node": "t", **over}), det, store=store,
                  metrics=m, max_streams={"many": 3})


def normal(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None]
    return (np.sin(t / 5.0 + np.arange(3)) + rng.normal(0, 0.05, (n, 3))).astype(np.float32)


def feed(e: Engine, stream: str, values: np.ndarray, t0: float = 1e9, block: int = 64,
         source: str | None = None) -> list:
    out = []
    for i in range(0, len(values), block):
        v = values[i:i + block]
        out += e.step([Batch(stream, t0 + np.arange(i, i + len(v), dtype=np.float64), v,
                             source=source)])
    return out


def windows(results) -> int:
    return sum(len(r.ts) for r in results)


def test_learning_fits_persists_and_survives_restart(model, tmp_path):
    cal = {"calibration": {"enabled": True, "samples": 200, "margin": 3.0}}
    e = engine_for(model, StateStore(tmp_path), **cal)
    res = feed(e, "s1", normal(300))
    st = e.streams["s1"]
    assert not st.baseline.learning and st.threshold > 0
    # learning windows are scored for the threshold but never reach the sinks
    assert windows(res) == 100
    # the states entered reach the sinks: learning first, then normal
    assert [s for r in res for s in r.entered] == ["learning", "normal"]
    assert (tmp_path / "calibration" / "s1.json").exists()

    e2 = engine_for(model, StateStore(tmp_path), **cal)
    res2 = feed(e2, "s1", normal(50, seed=1))
    st2 = e2.streams["s1"]
    assert not st2.baseline.learning, "restart learned again instead of restoring"
    assert st2.threshold == pytest.approx(st.threshold)
    np.testing.assert_allclose(st2.baseline.scaler.mean, st.baseline.scaler.mean)
    assert windows(res2) == 50 - W + 1


def test_learning_period_by_duration(model):
    e = engine_for(model, calibration={"enabled": True, "duration_s": 120.0})
    res = feed(e, "s1", normal(300), block=50)
    st = e.streams["s1"]
    # samples are 1 s apart: 120 learned, the rest scored
    assert st.baseline.samples_used == 120 and windows(res) == 180
    e2 = engine_for(model, calibration={"enabled": True, "duration_s": 120.0})
    feed(e2, "s1", normal(60))
    assert e2.pending("s1") == {"status": "learning", "needed": None}


def test_anomaly_opens_and_closes_an_alert(model):
    e = engine_for(model, calibration={"enabled": True, "samples": 200, "margin": 1.5},
                   alerts={"open_k": 3, "open_n": 5, "close_m": 5})
    v = normal(600)
    v[400:450, 1] += 8.0          # a step on channel b
    res = feed(e, "s1", v)
    events = [ev for r in res for ev in r.events]
    assert [ev["type"] for ev in events][0] == "new" and events[-1]["type"] == "end"
    assert events[-1]["reason"] == "recovered"
    assert events[0]["top_channels"][0]["name"] == "b"
    ts = np.concatenate([r.ts for r in res])
    opened = ts[np.concatenate([r.alert_open for r in res]) == 1] - 1e9
    assert opened.min() >= 400 and opened.max() < 470
    assert [s for r in res for s in r.entered] == ["learning", "normal", "anomaly", "normal"]


def test_streams_due_in_one_step_share_one_ort_run(model):
    e = engine_for(model)
    m = e.metrics
    v = normal(W)
    before = len(m._lat_ms)
    e.step([Batch(f"s{i}", 1e9 + np.arange(W, dtype=np.float64), v) for i in range(8)])
    assert len(e.streams) == 8
    assert m.windows_inferred == 8
    assert len(m._lat_ms) - before == 1, "8 due windows should be one batched ORT run"


def test_steps_and_the_streams_they_held_are_counted(model):
    """health steps / stream_steps: samples_in / stream_steps is what a step gives a stream."""
    e = engine_for(model)
    m = e.metrics
    v = normal(6)
    # two one-sample batches of s0 joined into one stream step; s1 once
    e.step([Batch("s0", 1e9 + np.arange(1.0), v[:1]), Batch("s1", 1e9 + np.arange(2.0), v[:2]),
            Batch("s0", 1e9 + np.arange(1.0, 3.0), v[1:3])])
    e.step([Batch("s1", 1e9 + np.arange(2.0, 5.0), v[2:5])])
    assert (m.steps, m.stream_steps, m.samples_in) == (2, 3, 8)
    snap = m.snapshot()
    assert (snap["steps"], snap["stream_steps"]) == (2, 3)


def test_one_sample_batches_of_a_stream_are_joined_in_order(model):
    """50 one-sample messages in one tick give the results one 50-sample batch gives."""
    v = normal(200)
    ts = 1e9 + np.arange(200, dtype=np.float64)
    a, b = engine_for(model), engine_for(model)
    ra = a.step([Batch("s", ts[i:i + 1], v[i:i + 1]) for i in range(200)])
    rb = b.step([Batch("s", ts, v)])
    np.testing.assert_array_equal(np.concatenate([r.scores for r in ra]),
                                  np.concatenate([r.scores for r in rb]))
    assert a.streams["s"].samples == 200


def test_a_huge_batch_is_inferred_in_bounded_chunks(model):
    e = engine_for(model, max_batch=64)
    n = 5000
    res = e.step([Batch("s", 1e9 + np.arange(n, dtype=np.float64), normal(n))])
    assert windows(res) == n - W + 1
    # every ORT call had at most max_batch windows: one call per 64 windows
    assert len(e.metrics._lat_ms) == -(-(n - W + 1) // 64) + 1     # + the warm-up at load
    np.testing.assert_array_equal(np.concatenate([r.ts for r in res]),
                                  1e9 + np.arange(W - 1, n))


def test_missing_values_are_filled_or_skipped_never_crash(model):
    e = engine_for(model, buffer={"ffill_max": 2})
    v = normal(200)
    v[50, 0] = np.nan                     # one gap: forward-filled
    v[100:110, 2] = np.nan                # ten: windows containing them are skipped
    res = feed(e, "s1", v)
    st = e.streams["s1"]
    assert st.ring.skipped > 0
    assert np.isfinite(np.concatenate([r.scores for r in res])).all()
    assert e.metrics.windows_inferred == windows(res) == 200 - W + 1 - st.ring.skipped


def test_streams_per_source_are_capped_and_counted(model, caplog):
    e = engine_for(model)
    caplog.set_level(logging.WARNING, logger="tsad.engine")
    for i in range(5):
        e.step([Batch(f"dev{i}", np.array([1e9]), normal(1), source="many")])
    assert sorted(e.streams) == ["dev0", "dev1", "dev2"]
    assert e.metrics.dropped["stream_limit"] == 2
    assert caplog.text.count("refused") == 1
    # a stream of its own source (no cap given) is one stream
    e.step([Batch("solo", np.array([1e9]), normal(1))])
    assert "solo" in e.streams


def test_a_stream_a_command_made_shows_learning_only_from_its_first_sample(model):
    e = engine_for(model, calibration={"enabled": True, "samples": 20})
    e.admission.named = {"s1"}
    assert e.shelve("s1", 600) is not None and e.streams["s1"].baseline.learning
    assert e.take_entered() == []       # no sample yet: still shown `normal`, as configured
    res = feed(e, "s1", normal(5))
    assert [st for r in res for st in r.entered] == ["learning"]


def test_a_stream_id_belongs_to_one_source(model, caplog):
    """A topic level equal to another stream's id must not merge two devices' samples."""
    m = Metrics()
    e = Engine(build(DetectionConfig, {"node": "t"}), Detector(model, metrics=m), metrics=m,
               max_streams={"many": 3, "other": 3}, named={"pump", "many", "other"})
    caplog.set_level(logging.WARNING, logger="tsad.engine")
    t = np.array([1e9])
    # a configured stream's id is its own source's, even before its first sample
    e.step([Batch("pump", t, normal(1), source="many")])
    assert "pump" not in e.streams and m.dropped["stream_collision"] == 1
    e.step([Batch("pump", t, normal(1))])
    assert e.streams["pump"].source == "pump" and e.streams["pump"].samples == 1
    # any other id: the first source to use it; the other's parts of a step are refused
    e.step([Batch("dev", t, normal(1), source="many")])
    e.step([Batch("dev", t + 1, normal(1), source="other"), Batch("dev", t + 1, normal(1), source="many"),
            Batch("pump", t + 1, normal(1), source="many"), Batch("pump", t + 1, normal(1))])
    assert e.streams["dev"].source == "many" and e.streams["dev"].samples == 2
    assert e.streams["pump"].samples == 2
    assert m.dropped["stream_collision"] == 3
    e.step([Batch("dev", t + 2, normal(1), source="other")])
    assert e.streams["dev"].samples == 2 and m.dropped["stream_collision"] == 4
    assert caplog.text.count("refused: source") == 2          # once per stream and source
    assert e.admission.counts == {"pump": 1, "many": 1}


def test_idle_streams_are_evicted_and_come_back_with_their_baseline(model, tmp_path, caplog):
    e = engine_for(model, StateStore(tmp_path), buffer={"idle_evict_s": 60},
                   calibration={"enabled": True, "samples": 100, "margin": 3.0})
    feed(e, "s1", normal(150))
    thr = e.streams["s1"].threshold
    e.streams["s1"].last_seen -= 61
    with caplog.at_level(logging.INFO, logger="tsad.engine"):
        assert e.evict_idle() == ["s1"] and "s1" not in e.streams
    # the journal names the sensor that fell silent
    assert "evicted 1 idle stream(s) (no sample for 60 s): s1" in caplog.text
    assert e.metrics.dropped["stream_evicted"] == 1
    res = feed(e, "s1", normal(50, seed=2), t0=2e9)
    assert e.streams["s1"].threshold == pytest.approx(thr)
    assert not e.streams["s1"].baseline.learning and windows(res) == 50 - W + 1


def test_a_learning_stream_stays_through_a_silence_shorter_than_its_learning(model, caplog,
                                                                            monkeypatch):
    """A day's learning on a machine that stands every night: the held samples must
    outlive the night, while a one-off id leaves after idle_evict_s, and so does one
    whose few samples only claim to span a day (a device clock's step forward)."""
    import agent.baseline
    clock = types.SimpleNamespace(t=1000.0)
    monkeypatch.setattr(agent.baseline, "time", types.SimpleNamespace(
        monotonic=lambda: clock.t, strftime=time.strftime, gmtime=time.gmtime))
    e = engine_for(model, buffer={"idle_evict_s": 60},
                   calibration={"enabled": True, "duration_s": 86400, "margin": 3.0})
    v = normal(40)
    for k in range(4):                                   # 12 h of running, samples and
        clock.t = 1000.0 + k * 4 * 3600                  # wall clock alike
        feed(e, "day", v[10 * k:10 * (k + 1)], t0=1.7e9 + k * 4 * 3600)
        # the same, its device clock reset to 2000 before the last block (an RTC battery)
        feed(e, "reset", v[10 * k:10 * (k + 1)], t0=1.7e9 + k * 4 * 3600 if k < 3 else 9.5e8)
    feed(e, "once", normal(1), t0=3e9)
    feed(e, "jump", normal(2), t0=4e9)
    feed(e, "jump", normal(2), t0=4e9 + 86400)           # a day later by its clock only
    for sid in ("day", "reset", "once", "jump"):
        e.streams[sid].last_seen = clock.t + 9
    day = e.streams["day"]
    assert day.baseline.learning_for(day.last_seen) == pytest.approx(12 * 3600 + 9, abs=1)
    reset = e.streams["reset"]
    assert reset.baseline.learning_for(reset.last_seen) == pytest.approx(8 * 3600 + 18, abs=1)
    now = day.last_seen + 7 * 3600                       # then the night
    with caplog.at_level(logging.WARNING, logger="tsad.engine"):
        assert sorted(e.evict_idle(now)) == ["jump", "once"]
        assert e.evict_idle(now + 5 * 3600 + 10) == ["day", "reset"]  # silent longer
    assert ("stream day: dropped while learning, silent for longer than it had learned and "
            "than buffer.idle_evict_s: 40 held samples lost") in caplog.text


def test_an_open_alert_keeps_its_stream_in_memory(model):
    e = engine_for(model, scoring={"threshold": 0.5}, buffer={"idle_evict_s": 60},
                   alerts={"open_k": 1, "open_n": 1})
    v = normal(40)
    v[-5:] += 50.0
    feed(e, "s1", v)
    assert e.streams["s1"].tracker.state == "anomaly"
    e.streams["s1"].last_seen -= 61
    assert e.evict_idle() == []


def test_a_failing_stream_does_not_stop_the_others(model, caplog):
    e = engine_for(model)
    caplog.set_level(logging.ERROR, logger="tsad.engine")
    bad = Batch("bad", np.array([1e9, 1e9 + 1]), np.zeros((2, 5), np.float32))   # 5 channels
    ts = 1e9 + np.arange(W, dtype=np.float64)
    res = e.step([bad, Batch("good", ts, normal(W))])
    assert [r.stream for r in res if len(r.ts)] == ["good"]
    assert e.metrics.errors["stream_ingest"] == 1 and "bad" in caplog.text


def test_rebaseline_ends_the_alert_and_learns_again(model, tmp_path):
    store = StateStore(tmp_path)
    e = engine_for(model, store, calibration={"enabled": True, "samples": 100, "margin": 3.0},
                   alerts={"open_k": 1, "open_n": 1, "close_m": 50})
    v = normal(200)
    v[150:] += 30.0
    feed(e, "s1", v)
    assert e.streams["s1"].tracker.state == "anomaly"
    known, ev = e.rebaseline("s1")
    assert known and ev["type"] == "end" and ev["reason"] == "rebaseline"
    assert e.streams["s1"].state == "learning" and e.pending("s1")["status"] == "learning"
    assert not store.path("s1").exists()
    assert e.rebaseline("nope") == (False, None)
    res = feed(e, "s1", normal(150, seed=3) + 30.0, t0=2e9)   # the new normal
    assert e.streams["s1"].state == "normal" and windows(res) == 50
    assert not any(ev["type"] == "new" for r in res for ev in r.events)


def test_a_named_stream_takes_commands_before_its_first_sample(model, tmp_path):
    """Home Assistant shows a configured stream's buttons from the start: shelving or
    re-baselining it before its first sample works; an id the config does not name
    (a topic-named source's own id, a typo) is still unknown."""
    e = engine_for(model, StateStore(tmp_path), scoring={"threshold": 0.5},
                   alerts={"open_k": 1, "open_n": 1}, buffer={"idle_evict_s": 60})
    e.admission.named = {"s1", "s2"}
    assert e.shelve("many", 600) is None and e.shelve("nope", 600) is None
    assert e.rebaseline("nope") == (False, None) and sorted(e.streams) == []
    until = e.shelve("s1", 600)
    assert until is not None and until > time.time() + 500     # wall time: no sample time yet
    assert stream_status(e.streams["s1"])["shelved_until"] == iso_utc(until)
    assert e.streams["s1"].shelved       # what Prometheus shows
    assert e.evict_idle() == []          # idle from the command on, not from boot
    assert e.rebaseline("s2") == (True, None) and "s2" in e.streams
    v = normal(40)
    v[-5:] += 50.0
    t0 = 1e9            # a device clock years behind: the shelve keeps its 600 s, in its time
    shelved = feed(e, "s1", v, t0=t0)
    control = feed(e, "s2", v, t0=t0)
    assert not [ev for r in shelved for ev in r.events if ev["type"] == "new"]
    assert [ev["type"] for r in control for ev in r.events] == ["new"]
    assert 590 < e.streams["s1"].tracker.shelved_until - t0 <= 600
    late = feed(e, "s1", v, t0=t0 + 600)
    assert [ev["type"] for r in late for ev in r.events][:1] == ["new"]


def test_close_alerts_ends_every_open_alert_with_its_reason(model):
    e = engine_for(model, scoring={"threshold": 0.5}, alerts={"open_k": 1, "open_n": 1})
    v = normal(40)
    v[-3:] += 50.0
    feed(e, "x", v)
    feed(e, "y", normal(40))
    evs = e.close_alerts("stopped")
    assert [(ev["stream"], ev["type"], ev["reason"]) for ev in evs] == [("x", "end", "stopped")]
    assert e.close_alerts("stopped") == []


@pytest.mark.parametrize("interval", [1.0, 60.0, 180.0])
def test_gaps_are_judged_by_the_stream_own_pace(model, interval):
    """At 1 s, 1 min and 3 min sampling: jitter and a missing sample keep the window,
    a gap of 20 intervals restarts it, once."""
    e = engine_for(model)
    n = 300
    steps = np.full(n, interval)
    steps[50::37] = 2 * interval          # the odd missing sample
    steps[200] = 20 * interval            # the sensor was away
    ts = 1e9 + np.cumsum(steps)
    res = e.step([Batch("s", ts, normal(n))])
    st = e.streams["s"]
    assert st.pace.interval == pytest.approx(interval)
    assert st.ring.resets == 1
    assert windows(res) == (200 - W + 1) + (n - 200 - W + 1)


def test_a_given_interval_needs_no_learning(model):
    m = Metrics()
    e = Engine(build(DetectionConfig, {"node": "t"}), Detector(model, metrics=m),
               metrics=m, intervals={"hist": 180.0})
    ts = 1e9 + 180.0 * np.arange(40)
    ts[20:] += 3600                          # an hour away, within the first 32 steps
    e.step([Batch("s", ts, normal(40), source="hist")])
    assert e.streams["s"].ring.resets == 1 and not e.streams["s"].pace.learning


def test_a_learned_stream_keeps_no_learning_samples_and_a_fixed_ring(model):
    # memory per stream is bounded by design: the learning period's samples are let go
    # once the baseline is fitted, and the ring holds window + max_block rows whatever
    # came through it
    e = engine_for(model, calibration={"enabled": True, "samples": 200})
    feed(e, "s1", normal(200), block=50)
    st = e.streams["s1"]
    assert st.baseline.learning is False
    assert st.baseline._held is None
    ring_bytes = st.ring._buf.nbytes
    assert ring_bytes == (W + st.ring.max_block) * len(CH) * 4
    feed(e, "s1", normal(3000, seed=2), t0=1e9 + 200, block=1)
    # one sample at a time: the ring keeps less room behind its window, never more
    assert st.ring._buf.nbytes < ring_bytes and st.baseline._held is None


def test_streams_stepped_together_score_as_each_alone(model):
    """Many streams a sample each per step (their errors normalised at once, their
    alerts opened and closed a window at a time) give each stream, bit for bit, what
    the stream alone gives."""
    n, k = 520, 4
    data = [normal(n, seed=i) for i in range(k)]
    for i in range(k):          # alerts that open and close, at different times
        data[i][300 + 20 * i:350 + 20 * i, 1] += 8.0
    ts = 1e9 + np.arange(n, dtype=np.float64)
    over = {"calibration": {"enabled": True, "samples": 200, "margin": 1.5},
            "alerts": {"open_k": 3, "open_n": 5, "close_m": 5, "update_interval_s": 5.0},
            "scoring": {"normalize": "channel"}}
    m = Metrics()
    together = Engine(build(DetectionConfig, {"node": "t", **over}),
                      Detector(model, metrics=m), metrics=m, default_max_streams=k)
    got: dict = {}
    for j in range(n):
        for r in together.step([Batch(f"s{i}", ts[j:j + 1], data[i][j:j + 1])
                                for i in range(k)]):
            got.setdefault(r.stream, []).append(r)
    alerts = 0
    for i in range(k):
        alone = engine_for(model, **over)
        want = [r for j in range(n) for r in alone.step([Batch(f"s{i}", ts[j:j + 1],
                                                              data[i][j:j + 1])])]
        mine = got[f"s{i}"]
        for field in ("ts", "scores", "labels", "alert_open"):
            assert (np.concatenate([getattr(r, field) for r in mine]).tobytes()
                    == np.concatenate([getattr(r, field) for r in want]).tobytes())
        assert [r.events for r in mine] == [r.events for r in want]
        alerts += sum(ev["type"] in ("update", "end") for r in want for ev in r.events)
    assert alerts >= 2 * k


def test_errors_normalised_at_once_as_stream_by_stream():
    """normalized: each stream's rows divided by its own level (a stream without one
    keeps the model's scores and errors), row for row the arithmetic of one stream."""
    from agent.scoring import normalized

    class Due:      # what normalized asks of a stream and of its windows
        def __init__(self, level, k):
            self.level, self.k = level, k

        def shown_level(self, i):
            assert i == 0
            return self.level

        def __len__(self):
            return self.k

    rng = np.random.default_rng(2)
    # a level per window where a stream's windows span adapted levels
    parts = [Due(rng.random(3) + 0.5, 2), Due(None, 3), Due(rng.random(3) + 0.5, 1),
             Due(rng.random((2, 3)) + 0.5, 2)]
    err = rng.random((8, 3))
    scores = rng.random(8)
    got_scores, shown = normalized([(d, d) for d in parts], scores, err)
    off = 0
    for d in parts:
        e, s = err[off:off + d.k], scores[off:off + d.k]
        want_shown = e if d.level is None else e / d.level
        want = s if d.level is None else np.add.reduce(want_shown, axis=1) / 3
        assert shown[off:off + d.k].tobytes() == want_shown.tobytes()
        assert got_scores[off:off + d.k].tobytes() == want.tobytes()
        off += d.k
    plain = normalized([(parts[1], parts[1])], scores[:3], err[:3])
    assert plain[0].tobytes() == scores[:3].tobytes() and plain[1].tobytes() == err[:3].tobytes()


def test_a_step_of_many_adaptation_epochs_scores_as_epoch_by_epoch(model):
    """A step may conclude several pieces of one stream, each with its adapted level:
    256-sample steps score as 64-sample steps (one epoch each) do."""
    over = {"calibration": {"enabled": True, "samples": 200},
            "adaptation": {"enabled": True, "time_constant_s": 60.0},
            "scoring": {"normalize": "channel"}}
    v = normal(2400, seed=4)
    v[:, 0] += np.linspace(0.0, 3.0, 2400, dtype=np.float32)   # a drift the levels follow
    got = [np.concatenate([r.scores for r in feed(engine_for(model, **over), "s", v, block=b)])
           for b in (256, 64)]
    assert len(got[0]) == len(got[1]) > 2000
    np.testing.assert_allclose(got[0], got[1], rtol=1e-9)


@pytest.mark.parametrize("block,max_batch,stride", [(256, 256, 1), (1000, 24, 1), (700, 64, 3)])
def test_an_ingest_of_several_epochs_scores_as_one_epoch_per_ingest(model, monkeypatch, block,
                                                                    max_batch, stride):
    """An ingest may hold up to LAG + 1 adaptation epochs, each scaled by its own version;
    bit for bit what one epoch (of max_batch samples at most) per ingest gives: scores,
    alerts, and the adapted mean and level."""
    from agent import adaptation
    over = {"calibration": {"enabled": True, "samples": 200, "margin": 1.5},
            "adaptation": {"enabled": True, "time_constant_s": 60.0},
            "scoring": {"normalize": "channel", "smoothing": 5}, "buffer": {"stride": stride},
            "alerts": {"open_k": 3, "open_n": 5, "close_m": 5, "update_interval_s": 30.0}}
    v = normal(4000, seed=5)
    v[:, 0] += np.linspace(0.0, 3.0, 4000, dtype=np.float32)   # levels and means move
    v[1500:1700, 1] += 6.0        # an alert: its channel is frozen, the others learn
    v[2600:2650, 2] += 9.0

    def run():
        e = engine_for(model, max_batch=max_batch, **over)
        res = feed(e, "s", v, block=block)
        ad = e.streams["s"].adapter
        return ([np.concatenate([getattr(r, f) for r in res]).tobytes()
                 for f in ("ts", "scores", "labels", "alert_open")],
                [ev for r in res for ev in r.events], ad.version, ad.scaler.mean.tobytes(),
                ad.level.tobytes()), max(len(r.ts) for r in res)

    got, most = run()
    one = adaptation.Adapter.room

    def one_epoch(self):        # the ingest of one epoch, of max_batch at most
        if self.ingested // adaptation.EPOCH - adaptation.LAG > self.version:
            return 0
        return min(one(self), max_batch, adaptation.EPOCH - self.ingested % adaptation.EPOCH)

    monkeypatch.setattr(adaptation.Adapter, "room", one_epoch)
    want, most_one = run()
    assert most > most_one      # windows of several epochs per ingest, then of one
    assert got[2] > 50 and b"\x01" in got[0][3]          # epochs adapted; an alert opened
    assert got == want


def test_learning_periods_that_end_together_are_fitted_a_few_a_step(model, monkeypatch):
    """Streams that start together end their learning periods in one step; the engine fits
    while the step's fits took under fit_budget.FIT_SECONDS (the first fit always), holds
    the others' later samples back, and each stream still gets, bit for bit, what it gets
    alone."""
    import agent.fit_budget as fit_budget
    monkeypatch.setattr(fit_budget, "FIT_SECONDS", 0.0)     # one fit a step
    k, n, block = 5, 260, 40
    data = [normal(n, seed=i) for i in range(k)]
    data[3][230:, 0] += 8.0                     # one stream alerts after it has learned
    ts = 1e9 + np.arange(n, dtype=np.float64)
    over = {"calibration": {"enabled": True, "samples": 200}}
    m = Metrics()
    e = Engine(build(DetectionConfig, {"node": "t", **over}), Detector(model, metrics=m),
               metrics=m, default_max_streams=k)
    got: dict = {}
    learned = []
    steps = [[Batch(f"s{i}", ts[a:a + block], data[i][a:a + block]) for i in range(k)]
             for a in range(0, n, block)]
    for batches in steps + [[], []]:        # the daemon steps at once while fits wait
        for r in e.step(batches):
            got.setdefault(r.stream, []).append(r)
        learned.append(sum(not st.baseline.learning for st in e.streams.values()))
    # the periods end in the step of rows 160-200; one fit a step from then on
    assert learned == [0, 0, 0, 0, 1, 2, 3, 4, 5]
    assert not e.held_back
    for i in range(k):
        alone = engine_for(model, **over)
        want = [r for a in range(0, n, block)
                for r in alone.step([Batch(f"s{i}", ts[a:a + block], data[i][a:a + block])])]
        mine = got[f"s{i}"]
        for field in ("ts", "scores", "labels", "alert_open"):
            assert (np.concatenate([getattr(r, field) for r in mine]).tobytes()
                    == np.concatenate([getattr(r, field) for r in want]).tobytes())
        assert [ev for r in mine for ev in r.events] == [ev for r in want for ev in r.events]
        states = [s for r in mine for s in r.entered]
        assert states == [s for r in want for s in r.entered]
        assert states[:2] == ["learning", "normal"]
        assert "anomaly" in states or i != 3
    # a fit waiting when no sample comes is done by an empty step
    e2 = Engine(build(DetectionConfig, {"node": "t", **over}), Detector(model, metrics=m),
                metrics=m, default_max_streams=k)
    e2.step([Batch(f"s{i}", ts[:200], data[i][:200]) for i in range(k)])
    assert len(e2.held_back) == 4 and all(e2.streams[s].state == "learning" for s in e2.held_back)
    for _ in range(4):
        e2.step([])
    assert not e2.held_back and not any(st.baseline.learning for st in e2.streams.values())


def test_window_restarts_are_logged_less_and_less_often(model, monkeypatch, caplog):
    """A bursty gateway: a gap every 5 minutes, all day.  Each restarts the window and is
    counted; the log backed off to one line per 10 minutes (144 a day) and now backs off
    to hourly as bad input does."""
    from agent import bad_input
    clock = types.SimpleNamespace(t=1000.0)
    monkeypatch.setattr(bad_input.time, "monotonic", lambda: clock.t)   # the time module's
    e = engine_for(model, buffer={"gap_reset_s": 60})
    with caplog.at_level(logging.WARNING, logger="tsad.stream"):
        for k in range(288):
            feed(e, "s", normal(W + 2, seed=k), t0=1e9 + k * 300)
            clock.t += 300
    assert e.streams["s"].ring.resets == 287
    said = [r for r in caplog.records if "its window starts again" in r.getMessage()]
    assert 1 <= len(said) <= 40, len(said)
    assert "(287 restart(s) so far" in said[-1].getMessage() or len(said) < 40


def test_a_fit_tells_its_progress_batch_by_batch_and_a_long_one_is_a_warning(model, monkeypatch,
                                                                             caplog):
    """One stream's fit is never split; the engine tells `fits.progress` (the daemon: the
    watchdog) after each batch it infers, and a fit over stream.LONG_FIT_S is a warning."""
    import agent.stream as stream_mod
    e = engine_for(model, max_batch=16, calibration={"enabled": True, "samples": 200})
    calls, told = [], []
    infer = e.detector.infer
    monkeypatch.setattr(e.detector, "infer", lambda x: calls.append(len(x)) or infer(x))
    e.fits.progress = lambda: told.append(len(calls))
    e.step([Batch("s", 1e9 + np.arange(199, dtype=np.float64), normal(199))])
    assert told == [] == calls
    with caplog.at_level(logging.INFO, logger="tsad.stream"):
        e.step([Batch("s", 1e9 + 199 + np.arange(1, dtype=np.float64), normal(1))])
    # the held samples go through in batches of 16: told after each batch inferred
    assert len(calls) >= 10 and told == list(range(1, len(calls) + 1))
    said = [r for r in caplog.records if "learned its baseline" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert " s, threshold" in said[0].getMessage()
    monkeypatch.setattr(stream_mod, "LONG_FIT_S", 0.0)
    caplog.clear()
    e.rebaseline("s")
    with caplog.at_level(logging.INFO, logger="tsad.stream"):
        e.step([Batch("s", 1e9 + 200 + np.arange(200, dtype=np.float64), normal(200, seed=1))])
    said = [r for r in caplog.records if "learned its baseline" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "no stream's samples were scored meanwhile" in said[0].getMessage()


def test_a_glitch_in_a_sample_missing_its_other_channels_does_not_inflate_the_threshold():
    """A learning-period sample with one glitched value and the other channels missing:
    the windows forward-fill it, so the scaler must count that value too.  Left out of its
    channel's std it was thousands of stds in the windows, and the threshold the learning
    windows set rose about 1900-fold (an audit of the real agent: the fault was missed)."""
    from agent.contract import read_table
    from agent.jobs import detection_config, run_table
    from agent.shipped import DEMO_CSV, resolve_model
    det = Detector(str(resolve_model("DLinear_ad")))
    t = read_table(DEMO_CSV, det.meta.channels)

    def threshold(values):
        eng = Engine(detection_config(det.meta, 400, {}), det)
        run_table(eng, "s", t.ts[:500], values[:500])
        return eng.streams["s"].baseline.threshold

    partial, complete = t.values.copy(), t.values.copy()
    partial[200] = np.nan
    complete[200] = complete[199]           # what forward-filling the partial one gives
    partial[200, 0] = complete[200, 0] = 1.0     # Accelerometer1RMS, about 0.2 when normal
    clean = threshold(t.values)
    assert threshold(partial) == pytest.approx(threshold(complete), rel=0.02)
    assert threshold(partial) < 1.5 * clean
