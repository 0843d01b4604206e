"""A device clock that steps back (accepted by the decoders after RESYNC_AFTER samples):
the time gates (cooldown, shelve, update interval, standing span, a learning period by
duration) keep the time they had left, counted on the new clock (agent/sample_clock.py),
through the real engine and a real ONNX model."""
from __future__ import annotations

import numpy as np
import pytest

from agent.commands import execute, parse
from agent.config import DetectionConfig
from agent.config_build import build
from agent.detector import Detector
from agent.engine import Engine
from agent.health import stream_status
from agent.sample_clock import STEP_S, SampleClock
from agent.sources.base import Batch
from agent.timestamps import iso_utc
from onnx_factory import make_model

W = 8
T0 = 1e9
DAY = 86_400.0


@pytest.fixture
def model(tmp_path):
    path, _ = make_model(tmp_path / "m.onnx", window=W, channels=["a", "b", "c"])
    return str(path)


def engine(model: str, **alerts) -> Engine:
    cfg = build(DetectionConfig, {"node": "n", "scoring": {"threshold": 1.0},
                                  "alerts": {"open_k": 1, "open_n": 1, "close_m": 2, **alerts}})
    return Engine(cfg, Detector(model))


def feed(e: Engine, values, t0: float, block: int | None = None) -> list:
    """Samples one second apart from t0, in steps of `block` samples (all at once: None)."""
    v = np.asarray(values, np.float32)
    ts = t0 + np.arange(len(v), dtype=np.float64)
    block = block or len(v)
    return [r for i in range(0, len(v), block)
            for r in e.step([Batch("pump", ts[i:i + block], v[i:i + block])])]


def quiet(n):
    return np.zeros((n, 3))


def loud(n):
    return np.full((n, 3), 100.0)


def events(results, kind=None):
    return [ev for r in results for ev in r.events if kind is None or ev["type"] == kind]


def ended_alert(e: Engine) -> None:
    """An alert at T0 + W that ends at the window of T0 + W + 2, then 10 quiet seconds:
    the last sample is T0 + W + 12."""
    feed(e, quiet(W), T0)
    assert [ev["type"] for ev in events(feed(e, loud(1), T0 + W))] == ["new"]
    assert [ev["type"] for ev in events(feed(e, quiet(2), T0 + W + 1))] == ["end"]
    feed(e, quiet(10), T0 + W + 3)


@pytest.mark.parametrize("cooldown", [0.0, 60.0])
def test_after_a_step_back_a_fault_opens_once_the_cooldown_left_has_passed(model, cooldown):
    e = engine(model, cooldown_s=cooldown)
    ended_alert(e)
    back = T0 + W + 13 - DAY            # the clock steps back a day
    new = events(feed(e, loud(100), back), "new")
    # the step counts as no time: 10 s of the cooldown had passed before it
    left = max(cooldown - 10.0, 0.0)
    assert [ev["start"] for ev in new] == [iso_utc(back + left)]


def test_without_a_step_the_cooldown_still_blocks_an_immediate_reopen(model):
    e = engine(model, cooldown_s=60.0)
    ended_alert(e)
    assert events(feed(e, loud(1), T0 + W + 13)) == []
    new = events(feed(e, loud(60), T0 + W + 14), "new")
    assert [ev["start"] for ev in new] == [iso_utc(T0 + W + 2 + 60)]


def test_a_step_forward_counts_as_time_that_passed(model):
    """A forward step looks like a gap (a device switched off): the cooldown is over."""
    e = engine(model, cooldown_s=3600.0)
    ended_alert(e)
    ahead = T0 + W + 13 + DAY
    new = events(feed(e, loud(2 * W), ahead), "new")
    # the gap restarts the window: the first window is due at its W-th sample
    assert [ev["start"] for ev in new] == [iso_utc(ahead + W - 1)]


def test_a_shelve_keeps_the_time_it_had_left_across_a_step_back(model):
    e = engine(model)
    feed(e, quiet(W), T0)                           # the last sample: T0 + W - 1
    result, _ = execute(parse(b'{"id": "s", "cmd": "shelve", "stream": "pump", "for_s": 60}'), e)
    assert result["shelved_until"] == iso_utc(T0 + W - 1 + 60)
    feed(e, quiet(10), T0 + W)                      # 10 s of the shelve pass
    back = T0 + W + 10 - DAY
    assert events(feed(e, loud(1), back)) == []     # still shelved after the step
    st = e.streams["pump"]
    # 50 s were left at the step: shown on the new clock
    assert st.shelved and stream_status(st)["shelved_until"] == iso_utc(back + 50)
    new = events(feed(e, loud(60), back + 1), "new")
    assert [ev["start"] for ev in new] == [iso_utc(back + 50)]
    assert not st.shelved and stream_status(st)["shelved_until"] is None


def test_an_open_alert_keeps_updating_and_comes_to_stand_after_a_step_back(model):
    e = engine(model, update_interval_s=10.0, standing_after_s=20.0)
    feed(e, quiet(W), T0)
    feed(e, loud(5), T0 + W)                        # opens at T0 + W, the last at T0 + W + 4
    back = T0 + W + 5 - DAY
    res = feed(e, loud(40), back, block=1)
    ups = [(float(r.ts[-1]), ev["standing"]) for r in res for ev in r.events]
    # elapsed time stands still across the step: due 10 s after the open (6 s after the
    # step), then every 10 s; the 20 s standing span is reached on the new clock too
    assert [t for t, _ in ups] == [back + 6, back + 16, back + 26, back + 36]
    assert ups[0][1] is False and ups[-1][1] is True


def test_a_learning_period_by_duration_is_not_lengthened_by_a_step_back(model):
    cfg = build(DetectionConfig, {"node": "n", "calibration": {"enabled": True,
                                                               "duration_s": 30.0}})
    e = Engine(cfg, Detector(model))
    rng = np.random.default_rng(0)
    feed(e, rng.normal(0, 0.1, (10, 3)), T0)        # T0 .. T0 + 9
    feed(e, rng.normal(0, 0.1, (40, 3)), T0 + 10 - DAY)
    b = e.streams["pump"].baseline
    # elapsed T0 + 9 at the step, T0 + 30 at its 21st sample: the period is over there
    assert not b.learning and b.samples_used == 31


@pytest.mark.parametrize("block", [1, 7, 64])
def test_chunks_give_what_one_sample_at_a_time_gives_across_steps(model, block):
    """The offsets follow the sample order: cooldown, updates and alerts across two steps
    back (one inside a chunk) are the same however the samples were chunked."""
    over = {"node": "n", "calibration": {"enabled": True, "samples": 50},
            "adaptation": {"enabled": True, "time_constant_s": 60.0},
            "alerts": {"open_k": 2, "open_n": 3, "close_m": 3, "cooldown_s": 40.0,
                       "update_interval_s": 5.0}}
    rng = np.random.default_rng(3)
    v = rng.normal(0, 0.2, (400, 3)).astype(np.float32)
    for a in (100, 150, 230, 300, 330):
        v[a:a + 12, 1] += 40.0
    ts = T0 + np.arange(400, dtype=np.float64)
    ts[140:] -= DAY                 # a step back while the cooldown runs
    ts[310:] -= 3600.0 + 0.5        # and one while an alert is open

    def run(b):
        e = Engine(build(DetectionConfig, over), Detector(model))
        res = [r for i in range(0, 400, b)
               for r in e.step([Batch("pump", ts[i:i + b], v[i:i + b])])]
        return ([np.concatenate([getattr(r, f) for r in res]).tobytes()
                 for f in ("ts", "scores", "labels", "alert_open")], events(res))

    got, want = run(block), run(400)
    assert got == want
    assert len([ev for ev in want[1] if ev["type"] == "new"]) >= 3


def test_the_clock_takes_only_real_steps_back_whatever_the_chunks():
    rng = np.random.default_rng(1)
    ts = T0 + np.cumsum(rng.uniform(0.2, 1.0, 300))
    ts += rng.uniform(-STEP_S, 0, 300) * 0.9       # jitter: never a step
    ts[100:] -= DAY
    ts[200:] -= 30.0
    one = SampleClock()
    offs = np.array([float(np.atleast_1d(one.take(ts[i:i + 1]))[0]) for i in range(300)])
    assert len(np.unique(offs)) == 3 and offs[0] == 0.0
    # elapsed time stands still across a step: the newest time before it
    assert offs[100] == pytest.approx(ts[:100].max() - ts[100])
    el = ts + offs
    assert (el[1:] - np.maximum.accumulate(el)[:-1] >= -STEP_S).all()
    for block in (7, 64, 300):
        c = SampleClock()
        assert c.peek(ts[:block]) is not None and c.offset == 0.0     # peek changes nothing
        got = np.concatenate([np.broadcast_to(c.take(ts[i:i + block]), len(ts[i:i + block]))
                              for i in range(0, 300, block)])
        np.testing.assert_array_equal(got, offs)
        assert (c.offset, c.newest) == (one.offset, one.newest)


def test_a_clock_that_repeats_its_times_does_not_repeat_alert_ids(model):
    """A device without an RTC battery restarts its clock at the same time at each
    power-up: a fault at the same point after two power-ups started at the same second,
    and both alerts had one id (the time audit), which consumers upsert and ack on."""
    e = engine(model)
    boot = 946_684_800.0
    v = quiet(40)
    v[20] = 100.0
    news = [ev for _ in range(2) for ev in events(feed(e, v, boot), "new")]
    assert [ev["start"] for ev in news] == [iso_utc(boot + 20)] * 2
    assert [ev["id"] for ev in news] == ["n:pump:946684820000", "n:pump:946684820001"]
