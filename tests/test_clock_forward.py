"""A clock that steps forward (NTP setting a Pi without an RTC forward after boot, a device
clock set ahead): on a live stream, whose batches carry the monotonic time they arrived,
the step is taken out of elapsed time as a step back is, and the time gates (a learning
period by duration, a refinement's span, a shelve, a cooldown) get the real time that
passed, not the step (agent/sample_clock.py).  A file has no real time: there a step
forward still counts as time that passed (tests/test_clock_steps.py)."""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest

from agent.commands import execute, parse
from agent.config import DetectionConfig
from agent.config_build import build
from agent.detector import Detector
from agent.engine import Engine
from agent.health import stream_status
from agent.device_clock import JUMP_S
from agent.sample_clock import SampleClock
from agent.sources.base import Batch
from agent.timestamps import iso_utc
from agent_harness import AgentProcess, Pty, tiny_model, wait_until, write_config
from onnx_factory import make_model

W = 8
T0 = 1.7e9
DAY = 86_400.0


def offsets(c: SampleClock, ts, arrivals, block: int = 1, interval=None) -> np.ndarray:
    """Take `ts`, each sample arriving at its `arrivals` time (None: no real time), in
    pieces of at most `block` samples that never span two arrivals."""
    ts = np.asarray(ts, np.float64)
    out, i = [], 0
    while i < len(ts):
        j = i + 1
        while j < len(ts) and j - i < block and arrivals[j] == arrivals[i]:
            j += 1
        c.arrive(arrivals[i], interval)
        out.append(np.broadcast_to(c.take(ts[i:j]), j - i))
        i = j
    return np.concatenate(out)


# ---------------------------------------------------------------- the clock
def test_a_live_step_forward_is_taken_out_and_real_time_goes_on():
    ts = T0 + np.arange(20.0)
    ts[10:] += 2 * DAY                      # NTP sets the clock forward two days
    arr = [float(i) for i in range(20)]     # one sample a second, really
    off = offsets(SampleClock(), ts, arr)
    el = ts + off
    np.testing.assert_allclose(np.diff(el), 1.0)     # elapsed time is real time
    assert off[0] == 0.0 and off[-1] == pytest.approx(-2 * DAY)


def test_without_real_time_a_step_forward_counts_as_time_that_passed():
    ts = T0 + np.arange(20.0)
    ts[10:] += 2 * DAY
    for block in (1, 20):
        np.testing.assert_array_equal(offsets(SampleClock(), ts, [None] * 20, block), 0.0)


def test_a_step_inside_a_block_goes_on_from_the_newest_elapsed_time():
    c = SampleClock()
    offsets(c, T0 + np.arange(5.0), [0.0] * 5)            # T0 .. T0 + 4, at once
    ts = T0 + np.array([5.0, 6.0, 7.0 + DAY, 8.0 + DAY])   # 1 s later: a step among them
    el = ts + offsets(c, ts, [1.0] * 4)
    # real time explains T0 + 5; the step's sample cannot go back behind T0 + 6
    np.testing.assert_array_equal(el, T0 + np.array([5.0, 6.0, 6.0, 7.0]))


@pytest.mark.parametrize("block", [1, 8, 64])
def test_a_replay_faster_than_real_time_is_never_stepped(block):
    """A recording published at 20x (a test, a user replaying a CSV with its device
    timestamps): it runs ahead of real time by over an hour, one second a sample."""
    n = 5000
    ts = T0 + np.arange(n, dtype=np.float64)
    arr = [i // block * block * 0.05 for i in range(n)]       # blocks handed over at 20x
    assert ts[-1] - ts[0] - arr[-1] > 3600
    np.testing.assert_array_equal(offsets(SampleClock(), ts, arr, block), 0.0)


@pytest.mark.parametrize("interval", [None, 300.0])
def test_a_loggers_hourly_burst_of_5_minute_samples_is_not_stepped(interval):
    """A data logger uploads its last hour of 5-minute samples once an hour, all in one
    block; whether or not the stream knows its interval yet."""
    ts = T0 + 300.0 * np.arange(60)
    arr = [3600.0 * (i // 12) for i in range(60)]
    np.testing.assert_array_equal(offsets(SampleClock(), ts, arr, 12, interval), 0.0)


def test_a_real_gap_counts_as_time_that_passed():
    """A device off for two hours: its next sample is two hours later, and so is real time."""
    ts = T0 + np.concatenate([np.arange(10.0), 7200 + np.arange(10.0)])
    arr = [float(t - T0) + 0.3 for t in ts]         # network delay: the same for all
    np.testing.assert_array_equal(offsets(SampleClock(), ts, arr), 0.0)


def test_a_jump_within_the_tolerance_of_real_time_is_not_a_step():
    ts = T0 + np.array([0.0, JUMP_S + 5.0])      # 65 s of sample time ...
    off = offsets(SampleClock(), ts, [0.0, 10.0])   # ... in 10 s: within the minute's slack
    np.testing.assert_array_equal(off, 0.0)
    off = offsets(SampleClock(), ts, [0.0, 4.0])    # in 4 s: a step, 4 s of real time
    assert ts[1] + off[1] == T0 + 4.0


@pytest.mark.parametrize("seed", range(4))
def test_the_offsets_follow_the_arrivals_not_the_chunks(seed):
    """Arrivals of random sizes and pace, with steps forward and back, some inside an
    arrival: taken one sample at a time, in pieces, or an arrival at once, the same."""
    rng = np.random.default_rng(seed)
    n = 600
    ts = T0 + np.cumsum(rng.uniform(0.5, 1.5, n))
    for at in rng.choice(n, 6, replace=False):
        ts[at:] += rng.choice([-DAY, -30.0, 90.0, DAY, 3 * DAY])
    sizes = rng.integers(1, 40, n)
    arr, i, now = [], 0, 0.0
    for s in sizes:
        now += rng.choice([0.01, 1.0, 30.0, 200.0])
        arr += [now] * int(min(s, n - i))
        i += int(s)
        if i >= n:
            break
    want = offsets(SampleClock(), ts, arr, 1)
    assert len(np.unique(want)) > 4                 # steps were taken, both ways
    for block in (3, 8, 9, 64, n):
        one = SampleClock()
        got = offsets(one, ts, arr, block)
        np.testing.assert_array_equal(got, want)
    # peek changes nothing and agrees with take
    c = SampleClock()
    c.arrive(0.0, None)
    assert c.peek(ts[:50]) is not None and (c.offset, c.newest) == (0.0, -np.inf)


# ---------------------------------------------------------------- through the engine
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = make_model(tmp_path_factory.mktemp("m") / "m.onnx", window=W,
                         channels=["a", "b", "c"])
    return str(path)


def live(e: Engine, values, ts, arrived, block: int = 1) -> list:
    """Samples stamped `ts`, in steps of `block`, each handed over when its last sample
    arrived (`arrived` per sample; None: a file)."""
    v = np.asarray(values, np.float32)
    return [r for i in range(0, len(v), block)
            for r in e.step([Batch("pump", ts[i:i + block], v[i:i + block], arrived=None
                                   if arrived is None else arrived[min(i + block, len(v)) - 1])])]


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("real", [True, False])
def test_f1_a_learning_period_by_duration_outlasts_ntp_setting_the_clock_forward(
        model, block, real, caplog):
    """Audit F1: samples stamped on arrival, `duration_s: 60`; NTP sets the wall clock two
    days forward 20 s in.  Live, the period still lasts 60 s of real time; a file has no
    real time, and there the step still ends it (today's rule)."""
    cfg = build(DetectionConfig, {"node": "n", "calibration": {"enabled": True,
                                                               "duration_s": 60.0}})
    e = Engine(cfg, Detector(model))
    n = 100
    arrived = 500.0 + np.arange(n)              # monotonic: one sample a second
    ts = T0 + np.arange(n, dtype=np.float64)    # the wall clock at arrival ...
    ts[20:] += 2 * DAY                          # ... set forward by NTP
    v = np.random.default_rng(0).normal(0, 0.1, (n, 3))
    with caplog.at_level(logging.INFO, logger="tsad.stream"):
        live(e, v, ts, arrived if real else None, block)
    b = e.streams["pump"].baseline
    assert not b.learning
    if real:
        # the step's sample gets the real time since the block before it, and the samples
        # that arrived with it their own spacing: a block's span early at most
        assert 60 - block < b.samples_used <= 60
        # and the log says how long it learned, not the two days the clock jumped
        said = [r.getMessage() for r in caplog.records if "learned its baseline" in
                r.getMessage()]
        assert len(said) == 1 and " min of sample time" in said[0]
        assert float(said[0].split("(")[1].split(" min")[0]) <= 1.0
    else:
        assert b.samples_used == 20


def test_f6_a_step_forward_after_learning_does_not_spend_the_refinement(model, caplog):
    """Audit F6: the clock steps two hours forward just after learning; the refinement's
    span still runs on real time and counts its windows, where (no gap being a stop) the
    step used to end it with none."""
    cfg = build(DetectionConfig, {
        "node": "n", "calibration": {"enabled": True, "samples": 100, "margin": 4.0,
                                     "refine": {"after_s": 30, "span_s": 1200}},
        "adaptation": {"enabled": True, "time_constant_s": 600},
        # no gap is a stop (refine.py): with the gap rule, a file's step pauses the span
        "buffer": {"gap_reset_s": None}})
    n = 1600
    v = 10.0 + np.random.default_rng(1).normal(0, 1.0, (n, 3))
    ts = T0 + np.arange(n, dtype=np.float64)
    ts[110:] += 7200.0

    def refined(arrived):
        e = Engine(cfg, Detector(model))
        caplog.clear()
        with caplog.at_level("INFO", logger="tsad.stream"):
            live(e, v, ts, arrived, block=16)
        b = e.streams["pump"].baseline
        return b.refined, b.refined_from, [r.getMessage() for r in caplog.records
                                          if "threshold" in r.getMessage()]

    done, was, msgs = refined(1000.0 + np.arange(n, dtype=np.float64))
    assert done and was is not None, msgs          # refined on the span's windows
    done, was, msgs = refined(None)                # a file: the step spends the span
    assert done and was is None and any("the 0 normal windows" in m for m in msgs), msgs


def alerting(model, **alerts) -> Engine:
    cfg = build(DetectionConfig, {"node": "n", "scoring": {"threshold": 1.0},
                                  "alerts": {"open_k": 1, "open_n": 1, "close_m": 2, **alerts}})
    return Engine(cfg, Detector(model))


def test_a_shelve_keeps_its_time_across_a_live_step_forward(model):
    e = alerting(model)
    ts = T0 + np.arange(W, dtype=np.float64)
    live(e, np.zeros((W, 3)), ts, 100.0 + np.arange(W))     # the last: T0 + 7 at 107
    execute(parse(b'{"id": "s", "cmd": "shelve", "stream": "pump", "for_s": 60}'), e)
    ahead = T0 + W + DAY                    # a day forward, one real second later
    n = 80
    res = live(e, np.full((n, 3), 100.0), ahead + np.arange(n), 108.0 + np.arange(n))
    st = e.streams["pump"]
    new = [ev for r in res for ev in r.events if ev["type"] == "new"]
    # 59 s were left: the alert opens 59 s after the step, on the new clock
    assert [ev["start"] for ev in new] == [iso_utc(ahead + 59)]
    assert not st.shelved and stream_status(st)["shelved_until"] is None


def test_a_cooldown_keeps_its_time_across_a_live_step_forward(model):
    e = alerting(model, cooldown_s=600.0)
    arr = 100.0 + np.arange(W + 13)
    ts = T0 + np.arange(W + 13, dtype=np.float64)
    v = np.zeros((W + 13, 3))
    v[W] = 100.0                            # an alert at T0 + W, ended at T0 + W + 2
    res = live(e, v, ts, arr)
    assert [ev["type"] for r in res for ev in r.events] == ["new", "end"]
    ahead = T0 + W + 13 + DAY
    n = 700
    res = live(e, np.full((n, 3), 100.0), ahead + np.arange(n), arr[-1] + 1 + np.arange(n))
    new = [ev["start"] for r in res for ev in r.events if ev["type"] == "new"]
    # the alert ended at T0 + W + 2; 11 s of the cooldown had passed at the step
    assert new == [iso_utc(ahead + 589)]


@pytest.mark.parametrize("block", [1, 5, 64])
def test_the_engine_gives_the_same_results_for_the_same_arrivals_however_chunked(model, block):
    """Arrivals of 64 samples each, with steps forward (one inside an arrival) while a
    cooldown runs and while an alert is open: stepped one sample at a time, in pieces of
    an arrival or an arrival at once, the same windows, scores and alerts."""
    over = {"node": "n", "calibration": {"enabled": True, "duration_s": 100.0},
            "adaptation": {"enabled": True, "time_constant_s": 60.0},
            "alerts": {"open_k": 2, "open_n": 3, "close_m": 3, "cooldown_s": 40.0,
                       "update_interval_s": 5.0}}
    rng = np.random.default_rng(3)
    n = 640
    v = rng.normal(0, 0.2, (n, 3)).astype(np.float32)
    for a in (200, 250, 330, 400, 430, 520):
        v[a:a + 12, 1] += 40.0
    ts = T0 + np.arange(n, dtype=np.float64)
    ts[50:] += DAY                      # while learning
    ts[260:] += 3600.0                  # while the cooldown runs
    ts[405:] += 2 * DAY                 # while an alert is open
    arrived = 100.0 + (np.arange(n) // 64 * 64 + 63) * 0.5     # at twice real time

    def run(b):
        e = Engine(build(DetectionConfig, over), Detector(model))
        cuts = [(i, min(i + b, a + 64)) for a in range(0, n, 64) for i in range(a, a + 64, b)]
        res = [r for i, j in cuts
               for r in e.step([Batch("pump", ts[i:j], v[i:j], arrived=arrived[i])])]
        return ([np.concatenate([getattr(r, f) for r in res]).tobytes()
                 for f in ("ts", "scores", "labels", "alert_open")],
                [ev for r in res for ev in r.events], e.streams["pump"].clock.offset)

    got, want = run(block), run(64)
    assert got == want
    assert want[2] < -2 * DAY and len([ev for ev in want[1] if ev["type"] == "new"]) >= 3


# The real agent with time.time() running ahead of the real clock by the seconds in a file
# (argv[1]), read every 10 ms: what NTP does to a Pi's wall clock; monotonic time is left.
STEPPED_CLOCK = """
import sys, threading, time
path, real, ahead = sys.argv[1], time.time, [0.0]

def follow():
    while True:
        try:
            with open(path) as f:
                ahead[0] = float(f.read() or 0)
        except (OSError, ValueError):
            pass
        time.sleep(0.01)

threading.Thread(target=follow, daemon=True).start()
time.time = lambda: real() + ahead[0]
from agent.cli import main
sys.exit(main(["run", "--config", sys.argv[2]]))
"""


def test_f1_the_real_agent_keeps_learning_when_ntp_sets_its_clock_forward(tmp_path):
    """Audit F1 end to end: a serial stream stamped on arrival learns by `duration_s: 5`;
    1 s in, the agent's wall clock is set two days forward.  The period still lasts its
    5 s of real time (it ended at the next sample)."""
    pty, ahead = Pty(), tmp_path / "ahead"
    cfg = write_config(tmp_path / "agent.yaml", model=tiny_model(tmp_path), port=1,
                       serial_port=pty.path, state_dir=tmp_path / "state",
                       mqtt={"enabled": False}, calibration={"enabled": True, "duration_s": 5.0})
    text = cfg.read_text().replace("timestamp: first", "timestamp: none")
    cfg.write_text(text)
    agent = AgentProcess(cfg, tmp_path / "agent.log",
                         python=["-c", STEPPED_CLOCK, str(ahead)]).start()
    rng = np.random.default_rng(0)

    def write_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            a, b, c = rng.normal(0, 0.1, 3)
            os.write(pty.master, f"{a:.4f},{b:.4f},{c:.4f}\n".encode())
            time.sleep(0.02)

    try:
        agent.wait_log("open at")
        began = time.monotonic()
        write_for(1.0)
        ahead.write_text(str(2 * DAY))
        time.sleep(0.1)                     # the agent reads it within 10 ms
        write_for(2.0)
        assert agent.count("learned its baseline") == 0, agent.log()
        wait_until(lambda: write_for(0.2) or agent.count("learned its baseline"),
                   "the end of the learning period", timeout=20.0)
        assert time.monotonic() - began > 5.0
    finally:
        agent.close()
        pty.close()
