"""Threshold refinement (agent/refine.py, calibration.refine) with a real ONNX model:
recon = 0.9 x + 0.01 in scaled space, so a sample's error grows with how far it sits
from the stream's mean.  At 1 Hz a stream learns on 300 samples with a wide margin, runs
300 s, then its next 1,200 normal windows set its threshold anew."""
from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import numpy as np
import pytest

from agent.config import DetectionConfig, RefineConfig
from agent.config_build import build
from agent.detector import Detector
from agent.engine import Engine
from agent.health import stream_status
from agent.jobs import Recording, run_table
from agent.refine import Refiner, needed
from agent.sources.base import Batch
from agent.state_store import StateStore
from agent_harness import MOSQUITTO, AgentProcess, Pty, tiny_model, wait_until, write_config
from onnx_factory import make_model
from test_adaptation_restart import drained, write_lines

CH = ["a", "b", "c"]
LEARN = 300
AFTER, SPAN = 300.0, 1200.0
T0 = 1.7e9


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = make_model(tmp_path_factory.mktemp("m") / "affine.onnx", window=8, channels=CH)
    return str(path)


def engine(model: str, refine: dict | None = None, store: StateStore | None = None,
           **over) -> Engine:
    cal = {"enabled": True, "samples": LEARN, "margin": 4.0}
    if refine is not None:
        cal["refine"] = {"after_s": AFTER, "span_s": SPAN, **refine}
    d = {"node": "t", "calibration": cal, "adaptation": {"enabled": True, "time_constant_s": 600},
         "alerts": {"open_k": 3, "open_n": 5, "close_m": 5}, **over}
    return Engine(build(DetectionConfig, d), Detector(model), store=store)


def series(n: int, seed: int, fault: tuple[int, int, float] | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = 10.0 + rng.normal(0, 1.0, (n, len(CH)))
    if fault is not None:
        a, b, size = fault
        v[a:b] += size
    return v.astype(np.float32)


def run(e: Engine, values: np.ndarray, block: int, start: int = 0,
        ts: np.ndarray | None = None) -> Recording:
    rec = Recording()
    if ts is None:
        ts = T0 + np.arange(start, start + len(values), dtype=np.float64)
    for a in range(0, len(values), block):
        rec.add(e.step([Batch("s", ts[a:a + block], values[a:a + block])]))
    return rec


def switch(rec: Recording) -> tuple[float, float, float]:
    """(the threshold before the switch, after it, the time of the switch's window)."""
    t = rec.table("s")
    thr = t["threshold"]
    i = np.flatnonzero(thr != thr[0])
    assert len(i) and len(set(thr[i[0]:])) == 1, "one switch"
    return thr[0], thr[i[0]], t["ts"][i[0]]


def counted(caplog) -> int:
    """The normal windows the logged refinement was made on."""
    msg = [r.getMessage() for r in caplog.records if "threshold refined" in r.getMessage()]
    assert len(msg) == 1, msg
    return int(msg[0].rsplit(" on ", 1)[1].split()[0])


# the refinement is due at LEARN + AFTER + SPAN = 1,800 s; the fault comes well after it
N = 2600
FAULT = (2200, 2300, 2.0)


def test_the_refined_threshold_is_lower_and_finds_what_the_learned_one_missed(model):
    vals = series(N, seed=1, fault=FAULT)
    plain, refined = engine(model), engine(model, {"margin": 1.0})
    a, b = run(plain, vals, block=50), run(refined, vals, block=50)
    learned = a.table("s")["threshold"][0]
    thr = b.table("s")["threshold"]
    assert thr[0] == learned and thr[-1] < 0.7 * learned
    ts = b.table("s")["ts"]
    switch = ts[np.flatnonzero(thr != thr[0])[0]]
    assert switch == T0 + LEARN + AFTER + SPAN      # the first sample of the span's end
    assert refined.streams["s"].baseline.refined_from == learned
    shown = stream_status(refined.streams["s"])
    assert (shown["threshold"], shown["refined_from"]) == (thr[-1], learned)
    assert stream_status(plain.streams["s"])["refined_from"] is None
    # quiet on normal running either way; only the refined threshold sees the fault
    assert not [e for e in a.events if e["type"] == "new"]
    assert len([e for e in b.events if e["type"] == "new"]) == 1
    opened = ts[np.flatnonzero(b.table("s")["alert"])[0]]
    assert T0 + FAULT[0] <= opened < T0 + FAULT[1]


def test_refinement_switches_at_the_same_window_however_the_samples_come(model):
    vals = series(N, seed=2, fault=FAULT)
    one = run(engine(model, {"margin": 1.0}), vals, block=1)
    blocks = run(engine(model, {"margin": 1.0}), vals, block=257)
    ts = T0 + np.arange(N, dtype=np.float64)
    job = run_table(engine(model, {"margin": 1.0}), "s", ts, vals)
    for other in (blocks, job):
        for key in ("score", "threshold", "alert"):
            np.testing.assert_array_equal(one.table("s")[key], other.table("s")[key])
    assert len(set(one.table("s")["threshold"])) == 2


STOP = 45 * 60.0


@pytest.mark.parametrize("at", [500, 1200])
def test_a_stop_waits_with_the_span_however_the_samples_come(model, caplog, at):
    """The machine stands 45 min (under idle_evict_s) before the span (600-1800 s of
    running) or 600 s into it: the span counts running time, so it waits through the stop
    and still holds its windows.  It used to end during the stop (with 600 windows, or
    none) and keep the learned threshold for good."""
    ts = T0 + np.arange(N, dtype=np.float64)
    ts[at:] += STOP
    vals = series(N, seed=13, fault=FAULT)
    with caplog.at_level(logging.INFO, logger="tsad.stream"):
        one = run(engine(model, {"margin": 1.0}), vals, block=1, ts=ts)
    learned, refined, at_ts = switch(one)
    assert refined < 0.7 * learned
    # the step over the stop counts as no time: the end falls one sample later
    assert at_ts == ts[int(LEARN + AFTER + SPAN) + 1]
    # the 7 samples the window restarts on are not windows; one sample more fits
    assert counted(caplog) == SPAN - (7 - 1 if at > LEARN + AFTER else 0)
    others = [run(engine(model, {"margin": 1.0}), vals, block=257, ts=ts),
              run_table(engine(model, {"margin": 1.0}), "s", ts, vals)]
    for other in others:
        for key in ("score", "threshold", "alert"):
            np.testing.assert_array_equal(one.table("s")[key], other.table("s")[key])


def test_too_few_normal_windows_keep_the_learned_threshold(model, caplog):
    # a 200 s span holds 200 windows, under the 1,000 the 0.99 quantile needs
    e = engine(model, {"margin": 1.0, "span_s": 200.0})
    with caplog.at_level(logging.INFO, logger="tsad.stream"):
        rec = run(e, series(N, seed=3), block=64)
    assert len(set(rec.table("s")["threshold"])) == 1
    assert e.streams["s"].baseline.refiner is None          # done, not pending
    assert any("threshold kept" in r.getMessage() and "at least 1000 needed" in r.getMessage()
               for r in caplog.records)


def test_a_refinement_never_raises_the_threshold():
    r = Refiner(RefineConfig(after_s=0.0, span_s=100.0, margin=1.5), 0.9)
    el = np.arange(100.0)
    assert r.room(el, None) == 100
    r.keep(el, np.full(100, 1.8), 2.0, np.ones(100, bool))  # every window near the threshold
    assert needed(0.9) == 100
    new, n = r.refined(2.0)
    assert new is None and n == 100
    r2 = Refiner(RefineConfig(after_s=0.0, span_s=100.0, margin=1.5), 0.9)
    r2.room(el, None)
    r2.keep(el, np.linspace(0.02, 0.4, 100), 2.0, np.ones(100, bool))
    new, _ = r2.refined(2.0)
    # the 0.9 quantile of 0.01..0.2 is 0.181; its bin's upper edge, x 1.5, x the threshold
    assert 1.5 * 0.181 * 2.0 <= new <= 1.5 * 0.181 * 1.024 * 2.0


def test_a_block_never_crosses_the_span_end():
    r = Refiner(RefineConfig(after_s=10.0, span_s=20.0), 0.99)
    assert r.room(np.array([100.0, 101.0]), None) == 2      # the span counts from here
    r.took(2)
    assert r.room(np.array([125.0, 129.0, 130.0, 131.0]), None) == 2    # cut before 130
    r.took(2)
    r.keep(np.array([100.0, 101.0]), np.ones(2), 1.0, np.ones(2, bool))
    r.keep(np.array([125.0, 129.0]), np.ones(2), 1.0, np.ones(2, bool))
    assert not r.due()                              # nothing past the end taken yet
    # from the first sample past it, all (a clock's jitter back after it included)
    assert r.room(np.array([130.0, 129.9]), None) == 2
    r.took(0)                                       # a block that closed no window
    assert r.due()                                  # the next window to judge is past it
    # a clock's jitter back right after the span's end: the block still ends before the
    # first sample at or after it, whether the few-sample path or numpy finds it
    for el, k in (([125.0, 130.2, 129.9, 131.0], 1),
                  (np.r_[np.linspace(120.0, 129.0, 10), 130.2, 129.9, 131.0], 10)):
        r = Refiner(RefineConfig(after_s=10.0, span_s=20.0), 0.99)
        r.room(np.array([100.0]), None)
        assert r.room(np.asarray(el), None) == k


@pytest.mark.parametrize("block", [1, 10, 50])
@pytest.mark.parametrize("stop_at, counted_", [(16, 21), (6, 20)])
def test_a_stop_moves_the_span_end_and_windows_judged_later_keep_their_place(block, stop_at,
                                                                             counted_):
    """The span [110, 130) of running time at 1 Hz from 100; a stop of 100 s (gap rule 5 s)
    after the span has begun only moves its end (the windows before it still count, though
    judged after the stop was seen); one before the span moves the span."""
    el = np.r_[np.arange(100.0, 100.0 + stop_at), np.arange(100.0 + stop_at + 99, 250.0)]
    r = Refiner(RefineConfig(after_s=10.0, span_s=20.0), 0.99)
    taken, a = [], 0
    while not r.passed:
        k = r.room(el[a:a + block], 5.0)
        if not r.passed:
            r.took(k)
            taken.append(el[a:a + k])
            a += k
    assert el[a] == 230.0 and r.progress() == {"ran": 29.0}
    for t in taken:                 # judged only now, after every stop was seen
        r.keep(t, np.full(len(t), 0.5), 1.0, np.ones(len(t), bool))
    assert r.refined(1.0)[1] == counted_


@pytest.mark.parametrize("stride", [1, 2])
def test_the_switch_follows_the_first_sample_past_the_span_even_without_its_window(model,
                                                                                  stride):
    """The first sample at or after the span's end closes no window (stride 2), and the
    next one's clock jitters back under it: every way of feeding still switches at the
    same window."""
    span = SPAN * stride                # the same 1,200 windows
    end = int(LEARN + AFTER + span)
    n = end + 800
    ts = T0 + np.arange(n, dtype=np.float64)
    ts[end] = T0 + end + 0.1
    ts[end + 1] = T0 + end - 0.3
    vals = series(n, seed=8, fault=(end + 400, end + 500, 2.0))
    refine = {"margin": 1.0, "span_s": span}
    over = {"buffer": {"stride": stride}}
    recs = [run(engine(model, refine, **over), vals, block, ts=ts) for block in (1, 257)]
    recs.append(run_table(engine(model, refine, **over), "s", ts, vals))
    for other in recs[1:]:
        for key in ("score", "threshold", "alert"):
            np.testing.assert_array_equal(recs[0].table("s")[key], other.table("s")[key])
    assert len(set(recs[0].table("s")["threshold"])) == 2


def test_a_refined_threshold_survives_a_restart(model, tmp_path):
    vals = series(N, seed=4)
    store = StateStore(tmp_path)
    e = engine(model, {"margin": 1.0}, store=store)
    run(e, vals[:2000], block=64)
    e.save_baselines()
    saved = json.loads(store.path("s").read_text())
    learned, refined = saved["refined_from"], saved["threshold"]
    assert refined < learned and "refining" not in saved
    e2 = engine(model, {"margin": 1.0}, store=StateStore(tmp_path))
    rec = run(e2, vals[2000:], block=64, start=2000)
    st = e2.streams["s"]
    assert st.baseline.refiner is None and st.baseline.threshold == refined
    assert set(rec.table("s")["threshold"]) == {refined}


@pytest.mark.parametrize("cut", [700, 1000, 1500])
def test_a_restart_in_the_middle_of_the_span_resumes_it(model, tmp_path, caplog, cut):
    """Saved before, in and late in the span (600-1800 s): the restarted stream takes the
    span up where it was, its windows from before the restart still counted; the second
    the stream was away counts as a stop.  It used to start a new span at the restart."""
    vals = series(N, seed=12, fault=FAULT)
    store = StateStore(tmp_path)
    e = engine(model, {"margin": 1.0}, store=store)
    run(e, vals[:cut], block=64)
    e.save_baselines()
    saved = json.loads(store.path("s").read_text())
    assert "refined_from" not in saved and saved["refining"]["ran"] == cut - 1 - LEARN
    assert sum(saved["refining"].get("counts", [])) == max(0, cut - (LEARN + AFTER))
    with caplog.at_level(logging.INFO, logger="tsad.stream"):
        rec = run(engine(model, {"margin": 1.0}, store=StateStore(tmp_path)), vals[cut:],
                  block=64, start=cut)
    learned, refined, at = switch(rec)
    assert learned == saved["threshold"] and refined < 0.7 * learned
    assert at == T0 + LEARN + AFTER + SPAN + 1
    # the span's 1,200 windows, less the 7 samples the restarted window fills on (window
    # 8), plus the one sample more the span holds for the second the stream was away
    assert counted(caplog) == SPAN - (7 - 1 if cut > LEARN + AFTER else 0)
    t = rec.table("s")          # the refined threshold sees the fault, and only it
    opened = t["ts"][np.flatnonzero(t["alert"])[0]]
    assert T0 + FAULT[0] <= opened < T0 + FAULT[1]


def test_re_baselining_starts_a_new_refinement(model):
    e = engine(model, {"margin": 1.0})
    run(e, series(2000, seed=5), block=64)
    st = e.streams["s"]
    assert st.baseline.refiner is None and st.baseline.refined_from is not None
    st.relearn()
    assert st.baseline.refiner is None and st.baseline.refined_from is None
    run(e, series(LEARN + 10, seed=6), block=64, start=3000)
    assert st.baseline.refiner is not None and not st.baseline.learning


@pytest.mark.parametrize("key, bad", [
    *[("refined_from", v) for v in ("1.0", -1.0, 0, float("inf"), True)],
    *[("refining", v) for v in (1.0, {}, {"ran": -1.0}, {"ran": True}, {"ran": float("nan")},
                                {"ran": 5.0, "counts": [1] * 3},
                                {"ran": 5.0, "counts": [-1] + [0] * 299},
                                {"ran": 5.0, "counts": [1.0] * 300})]])
def test_a_saved_refinement_of_the_wrong_kind_is_refused(model, tmp_path, key, bad):
    store = StateStore(tmp_path)
    e = engine(model, {"margin": 1.0}, store=store)
    run(e, series(1000, seed=7), block=64)          # in the span: "refining" saved
    e.save_baselines()
    d = json.loads(store.path("s").read_text())
    assert StateStore(tmp_path).load("s", d["model_sha256"], len(CH), d["basis"]) is not None
    d.pop("refining")
    d[key] = bad
    store.path("s").write_text(json.dumps(d))
    assert StateStore(tmp_path).load("s", d["model_sha256"], len(CH), d["basis"]) is None


def _refining_agent(tmp_path: Path, pty: Pty, state: Path) -> Path:
    """The real agent's config on the pty: 40 samples of learning, a 12 s span 2 s on."""
    return write_config(
        tmp_path / "agent.yaml", model=tiny_model(tmp_path), port=1, serial_port=pty.path,
        state_dir=state, mqtt={"enabled": False}, scoring={"threshold": "model"},
        calibration={"enabled": True, "samples": 40, "margin": 4.0,
                     "refine": {"after_s": 2.0, "span_s": 12.0, "margin": 1.0}},
        sinks={"console": {"enabled": False}})


@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed")
def test_the_real_agent_refines_saves_and_keeps_the_refined_threshold(tmp_path):
    """The real agent process on a pty: samples 0.01 s apart, so a 12 s span holds 1,200
    windows.  It refines, a clean stop saves the refined threshold, and the restarted
    agent keeps it rather than refining again."""
    pty = Pty()
    state = tmp_path / "state"
    cfg = _refining_agent(tmp_path, pty, state)
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    try:
        agent.wait_log("open at")
        i = write_lines(pty, 0, np.random.default_rng(1).normal(0, 1.0, (1600, 3)))
        agent.wait_log("threshold refined from")
        wait_until(lambda: drained(pty), "the agent to read every line")
        agent.signal(signal.SIGTERM)
        agent.proc.wait(20)
        assert agent.proc.returncode == 0 and "Traceback" not in agent.log(), agent.log()
        rec = json.loads((state / "calibration" / "pump.json").read_text())
        assert rec["threshold"] < rec["refined_from"]
        again = AgentProcess(cfg, tmp_path / "agent2.log").start()
        agent = again
        again.wait_log("open at")
        write_lines(pty, i, np.random.default_rng(2).normal(0, 1.0, (1600, 3)))
        again.wait_log("baseline restored")
        wait_until(lambda: drained(pty), "the agent to read every line")
        again.signal(signal.SIGTERM)
        again.proc.wait(20)
        log = again.log()
        assert "learning its baseline" not in log and "threshold refined" not in log \
            and "threshold kept" not in log, log
        rec2 = json.loads((state / "calibration" / "pump.json").read_text())
        assert (rec2["threshold"], rec2["refined_from"]) == (rec["threshold"],
                                                             rec["refined_from"])
    finally:
        agent.close()
        pty.close()


@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed")
def test_the_real_agent_resumes_a_refinement_a_stop_interrupted(tmp_path):
    """The real agent, samples 0.01 s apart: stopped 7 s into its 12 s span (700 windows
    counted), then restarted and given 700 samples more, fewer than a new span would
    need (200 + 1,200) and than the refinement needs (1,000): it finishes the span on
    the windows from before the stop and those after it."""
    pty = Pty()
    state = tmp_path / "state"
    cfg = _refining_agent(tmp_path, pty, state)
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    try:
        agent.wait_log("open at")
        i = write_lines(pty, 0, np.random.default_rng(3).normal(0, 1.0, (940, 3)))
        wait_until(lambda: drained(pty), "the agent to read every line")
        agent.signal(signal.SIGTERM)
        agent.proc.wait(20)
        assert agent.proc.returncode == 0 and "Traceback" not in agent.log(), agent.log()
        rec = json.loads((state / "calibration" / "pump.json").read_text())
        assert rec["refining"]["ran"] == pytest.approx(8.99)
        assert 600 < sum(rec["refining"]["counts"]) <= 700
        agent = AgentProcess(cfg, tmp_path / "agent2.log").start()
        agent.wait_log("open at")
        write_lines(pty, i, np.random.default_rng(4).normal(0, 1.0, (700, 3)))
        agent.wait_log("threshold refined from")
        msg = next(ln for ln in agent.log().splitlines() if "threshold refined from" in ln)
        assert int(msg.rsplit(" on ", 1)[1].split()[0]) >= needed(0.99), msg
        assert "learning its baseline" not in agent.log()
    finally:
        agent.close()
        pty.close()


def test_a_refinement_is_saved_at_once_and_undone_when_the_config_drops_it(model, tmp_path):
    store = StateStore(tmp_path)
    e = engine(model, {"margin": 1.0}, store=store)
    run(e, series(2000, seed=9), block=64)          # no explicit save: the step queues it
    rec = json.loads(store.path("s").read_text())
    assert rec["threshold"] < rec["refined_from"]
    # refine turned off: the learned threshold comes back, and is what gets saved
    off = engine(model, None, store=StateStore(tmp_path))
    run(off, series(100, seed=10), block=64, start=2000)
    st = off.streams["s"]
    assert st.baseline.threshold == rec["refined_from"] and st.baseline.refined_from is None
    off.save_baselines()
    assert "refined_from" not in json.loads(store.path("s").read_text())


def test_a_threshold_the_learning_period_does_not_fit_is_never_marked_refined(model, tmp_path):
    store = StateStore(tmp_path)
    e = engine(model, {"margin": 1.0}, store=store,
               **{"calibration": {"enabled": True, "samples": LEARN, "threshold": "model",
                                  "refine": {"after_s": AFTER, "span_s": SPAN}}})
    run(e, series(2000, seed=11), block=64)
    e.save_baselines()
    assert "refined_from" not in json.loads(store.path("s").read_text())
    assert e.streams["s"].baseline.refiner is None
