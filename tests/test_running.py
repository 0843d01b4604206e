"""`running:`: a stopped machine is not judged (agent/running.py), through the real engine
and a real (tiny) ONNX model."""
from __future__ import annotations

import json

import numpy as np
import pytest

from agent.config import AgentConfig, DetectionConfig
from agent.config_base import ConfigError
from agent.config_build import build
from agent.detector import Detector
from agent.engine import Engine
from agent.metrics import Metrics
from agent.sources.base import Batch
from onnx_factory import make_model

CH = ["current", "b", "c"]
W = 16
RUNNING = {"channel": "current", "above": 1.0}
LEARN = {"enabled": True, "samples": 200, "margin": 1.5}
ALERTS = {"open_k": 3, "open_n": 5, "close_m": 5}


@pytest.fixture
def model(tmp_path):
    path, _ = make_model(tmp_path / "m.onnx", window=W, channels=CH, kind="timemix")
    return str(path)


def engine(model: str, **over) -> Engine:
    m = Metrics()
    return Engine(build(DetectionConfig, {"node": "t", "calibration": LEARN, "alerts": ALERTS,
                                          **over}), Detector(model, metrics=m), metrics=m)


def running(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None]
    v = np.sin(t / 5.0 + np.arange(3)) + rng.normal(0, 0.05, (n, 3))
    v[:, 0] = 3.0 + rng.normal(0, 0.05, n)       # a motor current while it runs
    return v.astype(np.float32)


def stopped(n: int) -> np.ndarray:
    """Nothing like running: no current, the other sensors far from their running values."""
    return np.tile(np.array([0.0, 5.0, -5.0], np.float32), (n, 1))


def feed(e: Engine, values: np.ndarray, block: int = 64) -> list:
    out = []
    for i in range(0, len(values), block):
        v = values[i:i + block]
        out += e.step([Batch("s", 1e9 + np.arange(i, i + len(v), dtype=np.float64), v)])
    return out


def events(res) -> list[dict]:
    return [ev for r in res for ev in r.events if ev["type"] != "update"]


def entered(res) -> list[str]:
    return [s for r in res for s in r.entered]


def day(stop_at=500, stop_n=200, after=300) -> np.ndarray:
    return np.concatenate([running(stop_at), stopped(stop_n), running(after, seed=1)])


def fault(n: int) -> np.ndarray:
    """Noise no reconstruction follows (a step, the tiny model soon does)."""
    return np.random.default_rng(7).normal(0, 4.0, n).astype(np.float32)


def test_a_planned_stop_raises_no_alert_and_shows_idle(model):
    v = day()
    assert [ev["type"] for ev in events(feed(engine(model), v))][:1] == ["new"], \
        "the stop should alarm without `running:` (else this test shows nothing)"
    e = engine(model, running=RUNNING)
    res = feed(e, v)
    assert events(res) == []
    assert entered(res) == ["learning", "normal", "idle", "warming_up", "normal"]
    assert e.metrics.samples_idle == 200
    # judged again from a new window: none mixes the stop with running
    ts = np.concatenate([r.ts for r in res]) - 1e9
    assert not ((ts >= 500) & (ts < 700 + W - 1)).any()
    assert ts.max() == 999 and ((ts >= 700 + W - 1).sum() == 300 - W + 1)


def test_an_open_alert_ends_when_the_machine_stops(model):
    v = day()
    v[420:500, 1] += fault(80)    # a fault, and the machine is stopped in it
    e = engine(model, running=RUNNING)
    evs = events(feed(e, v))
    assert [ev["type"] for ev in evs[-2:]] == ["new", "end"]
    assert evs[-1]["reason"] == "idle"
    assert evs[-1]["end"] == "2001-09-09T01:54:59.000Z"      # its last running sample, 499
    assert e.streams["s"].state == "normal"


def test_start_s_keeps_the_warm_up_unjudged_but_not_what_follows(model):
    v = day(after=400)
    v[700:740, 1] += fault(40)     # a start-up transient of 40 s
    assert [ev["type"] for ev in events(feed(engine(model, running=RUNNING), v))][:1] == ["new"]
    e = engine(model, running={**RUNNING, "start_s": 60})
    res = feed(e, v)
    assert events(res) == []
    ts = np.concatenate([r.ts for r in res]) - 1e9
    assert ts[ts >= 500].min() == 760 + W - 1       # the first window after start_s
    assert e.metrics.samples_idle == 200 + 60
    v[900:960, 2] += fault(60)     # a fault after the warm-up is still an alert
    assert [ev["type"] for ev in events(feed(engine(model, running={**RUNNING, "start_s": 60}),
                                             v))] == ["new", "end"]


@pytest.mark.parametrize("block", [1, 7, 333])
def test_results_do_not_depend_on_how_samples_are_split(model, block):
    v = day()
    v[420:500, 1] += fault(80)
    v[800:900:3, 0] = 0.2          # a current flickering at start-up
    cfg = {"running": {**RUNNING, "start_s": 30}}
    ref, got = feed(engine(model, **cfg), v, 64), feed(engine(model, **cfg), v, block)
    assert events(got) == events(ref) and events(ref)[-1]["reason"] == "idle"
    for key in ("ts", "scores"):
        np.testing.assert_array_equal(np.concatenate([getattr(r, key) for r in got]),
                                      np.concatenate([getattr(r, key) for r in ref]))


def test_a_missing_run_value_keeps_the_state_it_is_in(model):
    v = day()
    v[300:310, 0] = np.nan         # while running: still running (the fill covers the rest)
    v[600:610, 0] = np.nan         # while stopped: still stopped
    e = engine(model, running={**RUNNING, "start_s": 0})
    res = feed(e, v)
    assert e.metrics.samples_idle == 200
    assert entered(res).count("idle") == 1


def test_learning_learns_only_running(model):
    v = np.concatenate([running(100), stopped(300), running(300, seed=1)])
    e = engine(model, running=RUNNING)
    feed(e, v)
    st = e.streams["s"]
    assert not st.baseline.learning and st.baseline.samples_used == 200
    assert st.baseline.scaler.mean[0] == pytest.approx(3.0, abs=0.05)


def test_config_is_checked(model):
    with pytest.raises(ConfigError, match="running.*exactly one of above and below"):
        build(AgentConfig, {"node": "n", "model": {"path": model},
                            "streams": [{"id": "s", "source": {"type": "replay", "path": "x"}}],
                            "running": {"channel": "current", "above": 1, "below": 2}})
    with pytest.raises(ValueError, match="running.channel: 'amps' is not one of the model's "
                                         "channels \\(current, b, c\\)"):
        engine(model, running={"channel": "amps", "above": 1.0})


def test_replay_and_evaluate_take_it_as_a_flag(model, tmp_path, capsys):
    from agent.cli import main
    v = day()
    csv = tmp_path / "day.csv"
    rows = [f"{1e9 + i:.0f},{','.join(f'{x:.4f}' for x in r)}" for i, r in enumerate(v)]
    csv.write_text("timestamp," + ",".join(CH) + "\n" + "\n".join(rows) + "\n")
    spans = []
    for extra in ([], ["--running", "current>1", "--running-start-s", "5"]):
        out = tmp_path / f"alerts{len(extra)}.jsonl"
        assert main(["replay", str(csv), "-m", model, "--calibrate", "200", "-q",
                     "--alerts", str(out), *extra]) == 0
        evs = [json.loads(x) for x in out.read_text().splitlines()]
        ends = {ev["id"]: ev["end"] for ev in evs if ev["type"] == "end"}
        spans.append([(ev["start"], ends.get(ev["id"]) or "9999") for ev in evs
                      if ev["type"] == "new"])
    capsys.readouterr()
    stop = ("2001-09-09T01:55:00.000Z", "2001-09-09T01:58:20.000Z")     # rows 500-700

    def over_the_stop(spans):
        return [s for s in spans if s[0] < stop[1] and s[1] > stop[0]]
    assert over_the_stop(spans[0]) and not over_the_stop(spans[1])
    assert main(["replay", str(csv), "-m", model, "--running", "current=1"]) == 2
    assert "expected CHANNEL>LEVEL or CHANNEL<LEVEL" in capsys.readouterr().err
    assert main(["evaluate", str(csv), "-m", model, "--running", "amps<1"]) == 2
    assert "'amps' is not one of the model's channels" in capsys.readouterr().err


def test_a_device_clock_step_back_during_the_start_up_holds_nothing(model):
    """Review (twenty-second session): start_s ran on raw sample time, so a device clock
    stepping back a day during the start-up kept a running machine idle for a day."""
    e = engine(model, running={**RUNNING, "start_s": 60})
    v = day(stop_at=300, stop_n=100, after=400)
    ts = 1e9 + np.arange(len(v), dtype=np.float64)
    ts[430:] -= 86400.0              # 30 s into the start-up
    for i in range(len(v)):
        e.step([Batch("s", ts[i:i + 1], v[i:i + 1])])
    # judged again 60 s of elapsed time into the start-up (the step itself counts as no time)
    assert e.streams["s"].state != "idle" and e.metrics.samples_idle in (100 + 60, 100 + 61)


def test_a_stop_is_no_learning_time(model):
    """Review: a learning period set by duration ran on through a stop, and the fit took
    what came before it (5 samples: no window, the model's threshold, alerts on normal)."""
    e = engine(model, running=RUNNING, calibration={"enabled": True, "duration_s": 300.0})
    feed(e, np.concatenate([running(100), stopped(2000), running(400, seed=1)]))
    st = e.streams["s"]
    assert not st.baseline.learning and st.baseline.samples_used == 300


def test_a_rebaseline_while_stopped_shows_idle(model):
    e = engine(model, running=RUNNING)
    feed(e, np.concatenate([running(300), stopped(50)]))
    assert e.rebaseline("s")[0] and e.take_entered() == [("s", "idle")]


@pytest.mark.parametrize("stop_n", [5, 200])
def test_no_learning_window_joins_running_across_a_stop(model, stop_n):
    """Review (twenty-second session): judging starts a new window after a stop, but the
    learning period's windows joined the running before it to the running after it (a
    short stop: windows mixing both; a long one: logged as a time gap)."""
    e = engine(model, running=RUNNING)
    e.step([Batch("s", 1e9 + np.arange(100.0), running(100))])
    e.step([Batch("s", 1e9 + 100 + np.arange(float(stop_n)), stopped(stop_n))])
    fitted, infer = [], e.detector.infer
    e.detector.infer = lambda x: (fitted.append(len(x)), infer(x))[1]
    e.step([Batch("s", 1e9 + 100 + stop_n + np.arange(100.0), running(100, seed=1))])
    st = e.streams["s"]
    assert not st.baseline.learning and st.baseline.samples_used == 200
    assert sum(fitted) == 2 * (100 - W + 1)        # the running before the stop, and after
    assert st.ring.resets == 0                     # a stop, not a time gap
