"""A channel without a value (audit s20 F1, F2): the stream shows `no_data` naming it once
the channel has had no value for a window past the forward fill, and its verdict again at
the next window scored; every window left unscored counts in the process-wide
`windows_skipped`.  Engine level, one sample a step as the daemon gets them; the real agent
with Mosquitto is in test_faults_no_data.py."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import types

import numpy as np
import pytest

from agent.config import AgentConfig, DetectionConfig
from agent.config_build import build
from agent.detector import Detector
from agent.engine import Engine
from agent.health import health_snapshot, stream_status
from agent.metrics import Metrics
from agent.prom import DaemonCollector, shared_families
from agent.ring import RingBuffer
from agent.sources.base import Batch
from conftest import REPO
from onnx_factory import make_model

CH = ["a", "b", "c"]
W, FILL = 8, 3                  # the model's window, buffer.ffill_max
GONE = FILL + W                 # missing samples in a row that make a channel gone
NORMAL, ANOMALY = [0.0, 0.0, 0.0], [1000.0, 1000.0, 1000.0]


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


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_channel_gone_for_a_window_shows_no_data_until_a_window_scores(engine, caplog):
    feed = Feed(engine)
    feed(W + 2)
    assert feed.states == ["warming_up", "normal"]
    caplog.set_level(logging.INFO, "tsad.stream")
    feed(GONE - 1, without="b")
    # windows are dropped from the fourth missing sample on, but a dropout this short is
    # not a channel down: its windows would go unscored for a window after it anyway
    assert feed.st.ring.skipped == GONE - 1 - FILL > 0
    assert feed.st.state == "normal" and not _warnings(caplog)
    feed(1, without="b")
    assert feed.states[-1] == "no_data" and feed.st.state == "no_data"
    (warning,) = _warnings(caplog)
    assert "stream s: no value from b for 11 samples" in warning
    status = stream_status(feed.st)
    assert status["state"] == "no_data" and status["missing_channels"] == ["b"]
    feed(50, without="b")           # no flooding: one line, one state
    assert feed.states.count("no_data") == 1 and len(_warnings(caplog)) == 1
    # back: the windows still holding the gap are dropped, the first without it is judged
    feed(W - 1)
    assert feed.st.state == "no_data"
    feed(1)
    assert feed.st.state == "normal" and feed.states[-2:] == ["no_data", "normal"]
    assert stream_status(feed.st)["missing_channels"] == []
    ends = [r.getMessage() for r in caplog.records if "no_data ends" in r.getMessage()]
    assert ends == ["stream s: windows are scored again (b back): no_data ends"]


def test_a_flapping_channel_is_shown_each_time_and_logged_less_and_less(engine, caplog,
                                                                        monkeypatch):
    """A loose connector: the channel gone for a window, back for a window, over and over.
    The state follows every flap; the log backs off as bad input does (it wrote two lines
    a flap: 900 an hour at 20 Hz), saying how many flaps it left out.  A line left out is
    still owed: once the channel stays gone (or back), the log says so when the back-off
    allows, and another channel going is news at once."""
    from agent import bad_input
    clock = types.SimpleNamespace(t=1000.0)
    monkeypatch.setattr(bad_input.time, "monotonic", lambda: clock.t)
    feed = Feed(engine)
    feed(W + 2)
    caplog.set_level(logging.INFO, "tsad.stream")

    def lines(text: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if text in r.getMessage()]
    for _ in range(40):                     # a flap a minute for 40 minutes
        feed(GONE, without="b")
        feed(W + 2)
        clock.t += 60
    assert feed.states.count("no_data") == 40 and feed.st.state == "normal"
    went, back = lines("no value from b"), lines("no_data ends")
    assert 3 <= len(went) <= 12 and 3 <= len(back) <= 12, (went, back)
    assert "more time(s) since the last such line" in went[-1]
    # b gone for good: its last going was left out, and is said within the hour
    feed(GONE, without="b")
    for _ in range(60):
        clock.t += 60
        feed(1, without="b")
    assert feed.st.state == "no_data"
    last = [r.getMessage() for r in caplog.records][-1]
    assert "no value from b" in last, last
    # b back, then c gone: another channel is news at once
    feed(W + 2)
    caplog.clear()
    feed(GONE, without="c")
    assert len(lines("no value from c")) == 1


def test_a_channel_never_sent_shows_no_data_not_warming_up_for_ever(engine):
    feed = Feed(engine)
    feed(GONE - 1, without="c")
    assert feed.st.state == "warming_up"    # the first window is not even full before
    feed(1, without="c")
    assert feed.states == ["warming_up", "no_data"]
    assert feed.st.no_data == ("c",)
    feed(W)
    assert feed.states == ["warming_up", "no_data", "normal"]


def test_a_second_channel_gone_joins_the_names(engine):
    feed = Feed(engine)
    feed(W)
    feed(GONE, without="b")
    v = [0.0, np.nan, np.nan]
    feed(GONE, row=v)
    assert feed.st.no_data == ("b", "c") and feed.states.count("no_data") == 1


def test_an_open_alert_stays_open_and_shown_while_its_stream_has_no_data(engine, caplog):
    feed = Feed(engine)
    feed(W)
    feed(1, row=ANOMALY)
    assert feed.st.state == "anomaly"
    caplog.set_level(logging.WARNING, "tsad.stream")
    feed(GONE + 5, row=ANOMALY, without="a")
    # nothing judged since: the alert has not cleared, and no_data does not hide it
    assert feed.st.state == "anomaly" and feed.st.tracker.state == "anomaly"
    assert stream_status(feed.st)["missing_channels"] == ["a"]
    assert len(_warnings(caplog)) == 1 and "no_data" not in feed.states
    feed(W + 2)
    assert feed.st.state == "normal" and feed.st.no_data == ()


def test_recalibration_forgets_no_data_with_the_window(engine):
    feed = Feed(engine)
    feed(W)
    feed(GONE, without="b")
    assert feed.st.state == "no_data"
    assert engine.rebaseline("s")[0]
    assert feed.st.no_data == () and feed.st.state != "no_data"


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


def _scrape(engine: Engine) -> dict:
    c = DaemonCollector(engine.metrics)
    c.publish(engine, [], [])
    return {f.name: f for f in c.collect()}


def test_prometheus_names_the_state_and_the_channel(engine):
    feed = Feed(engine)
    feed(W)
    feed(GONE, without="b")
    fams = _scrape(engine)
    on = {s.labels["state"] for s in fams["tsad_stream_state"].samples if s.value == 1}
    assert on == {"no_data"}
    assert [(s.labels, s.value) for s in fams["tsad_stream_channel_missing"].samples] == \
        [({"stream": "s", "channel": "b"}, 1)]
    feed(W)
    fams = _scrape(engine)
    assert fams["tsad_stream_state"].samples[0].labels["state"] == "learning"
    assert not fams["tsad_stream_channel_missing"].samples


def test_a_wide_stream_names_ten_missing_channels_and_counts_them_all(tmp_path):
    """A 300-channel model with most of its tags gone made each stream's health entry 4 KB
    (and Prometheus a series per channel): both name the first 10, health counts them all."""
    chans = [f"tag{i:03d}" for i in range(30)]
    path, _ = make_model(tmp_path / "wide.onnx", window=W, channels=chans)
    m = Metrics()
    cfg = build(DetectionConfig, {"node": "t", "calibration": {"enabled": False},
                                  "scoring": {"threshold": 1.0}, "buffer": {"ffill_max": FILL}})
    e = Engine(cfg, Detector(str(path), metrics=m), metrics=m)
    v = np.zeros((W + GONE, 30), np.float32)
    v[W:, 5:] = np.nan                       # 25 channels gone
    for i in range(len(v)):
        e.step([Batch("s", np.array([1e9 + i]), v[i:i + 1])])
    status = stream_status(e.streams["s"])
    assert status["state"] == "no_data" and status["missing_count"] == 25
    assert status["missing_channels"] == chans[5:15]
    fams = _scrape(e)
    assert [s.labels["channel"] for s in fams["tsad_stream_channel_missing"].samples] == \
        chans[5:15]


def test_ring_names_a_channel_dead_for_a_window_past_the_fill_and_counts_unscored():
    ring = RingBuffer(window=4, channels=2, ffill_max=1)
    v = np.ones((20, 2), np.float32)
    v[6:, 1] = np.nan
    ring.push(np.arange(6.0), v[:6])
    assert ring.dead() == [] and ring.unscored == 0
    ring.push(np.arange(6.0, 10.0), v[6:10])     # missing 4 in a row: one short
    assert ring.dead() == [] and ring.unscored == 3
    ring.push(np.array([10.0]), v[10:11])
    assert ring.dead() == [1] and ring.unscored == 4
    assert ring.unfilled.tolist() == [0, 4]
    v[11:, 1] = 1.0
    w = ring.push(np.arange(11.0, 20.0), v[11:])
    # the windows ending at 11..13 still hold row 10; those at 14..19 are clean
    assert w.ts.tolist() == [14.0, 15.0, 16.0, 17.0, 18.0, 19.0]
    assert ring.unscored == 0 and ring.dead() == [] and ring.skipped == 7


# ---------------------------------------------------------------- file jobs
def _csv(path, n: int = 200, gone: slice = slice(50, 90)):
    """Rows of zeros with channel b empty over `gone`: 40 - FILL rows no fill covers."""
    rows = ["timestamp,a,b,c"] + [f"{1.6e9 + i:.0f},0,{'' if gone.start <= i < gone.stop else 0},0"
                                  for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _cli(*args) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "agent.cli", *map(str, args)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return r


def test_replay_says_how_many_windows_went_unscored_and_for_which_channel(tmp_path):
    path, _ = make_model(tmp_path / "m.onnx", window=W, channels=CH, threshold=1.0)
    r = _cli("replay", _csv(tmp_path / "f.csv"), "-m", path, "--calibrate", "0", "-q")
    # 37 rows without b: the 37 windows ending on them and the W - 1 after
    unscored = 40 - FILL + W - 1
    assert r.stderr.splitlines()[-1] == \
        f"replayed 200 samples, {200 - W + 1 - unscored} windows, {unscored} window(s) " \
        f"unscored (no value past the forward fill: b on 37 samples), 0 alert events; malformed 0"
    assert "stream replay: no value from b for 11 samples" in r.stderr


def test_evaluate_names_the_unscored_windows_of_each_file(tmp_path):
    path, _ = make_model(tmp_path / "m.onnx", window=W, channels=CH, threshold=1.0)
    f = _csv(tmp_path / "f.csv")
    full = _csv(tmp_path / "full.csv", gone=slice(0, 0))
    r = _cli("evaluate", "-m", path, "--calibration", "0", f, full)
    assert f"tiny_affine        {f}: {40 - FILL + W - 1} window(s) unscored (no value past " \
           f"the forward fill: b on 37 samples)" in r.stdout.splitlines()
    assert r.stdout.count("unscored") == 1      # the full file's windows were all scored
    js = json.loads(_cli("evaluate", "-m", path, "--calibration", "0", "--json", f,
                         full).stdout)
    assert [p["unscored"] for p in js["per_file"]] == [
        {"windows": 40 - FILL + W - 1, "missing": {"b": 37}}, {"windows": 0, "missing": {}}]
