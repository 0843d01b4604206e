"""Fitting a model's policy margin on normal data (agent/policy_fit.py), with a real ONNX
model: recon = 0.9 x + 0.01 in scaled space, so a row's error grows with how far it
sits from the model's mean.  Normal recordings at 3-minute sampling: four quiet weeks
of steady running, and plant starts that settle for an hour (a raised level) before
running steady, as the Tennessee Eastman runs do."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from agent.detector import Detector
from agent.policy_fit import (GRID, Segment, fit_policy, first_hours, learning_starts,
                              rounded_up, segments, start_trial)
from onnx_factory import make_model

CH = ["a", "b"]
STEP_S = 180.0
HOUR = int(3600 / STEP_S)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = make_model(tmp_path_factory.mktemp("m") / "affine.onnx", window=8, channels=CH)
    return str(path)


def write(path: Path, values: np.ndarray) -> Path:
    ts = pd.Timestamp("2024-01-01T00:00:00Z") + pd.to_timedelta(
        np.arange(len(values)) * STEP_S, unit="s")
    pd.DataFrame({"datetime": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
                  **{c: values[:, i] for i, c in enumerate(CH)}}).to_csv(path, index=False)
    return path


def recording(path: Path, hours: float, seed: int, settle: float = 0.0) -> Path:
    """Steady running (unit noise); with `settle`, the second hour sits that far off."""
    rng = np.random.default_rng(seed)
    v = rng.normal(0, 1.0, (int(hours * HOUR), len(CH)))
    v[HOUR:2 * HOUR] += settle
    return write(path, v)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("normal")
    steady = [recording(d / f"steady{i}.csv", 168, seed=i) for i in range(4)]
    starts = [recording(d / f"start{i}.csv", 12, seed=10 + i, settle=s)
              for i, s in enumerate([3.0, 3.5, 4.0, 7.0])]
    return steady, starts


SETTINGS = {"alerts": {"open_k": 4, "open_n": 5}}


def alerting(model: str, starts: list[Path], margin: float) -> int:
    det = Detector(model)
    segs = first_hours(segments(starts, det.meta.channels, 0), 0, 8.0)
    return start_trial(det, segs, SETTINGS, margin, 0)["alerting"]


def test_pooled_days_hide_the_starts_and_the_start_rule_quiets_them(model, data):
    steady, starts = data
    pooled = fit_policy(model, steady + starts, SETTINGS, 0, "test")
    m0 = pooled["fitted"]["result"]["margin"]
    # 30 days of running allow 30 alerts, 1 % of them is 7 hours: every start's settling
    # hour alarms
    assert alerting(model, starts, m0) == len(starts)
    p = fit_policy(model, steady + starts, SETTINGS, 0, "test", starts=starts,
                   start_quantile=1.0, safety=1.1)
    s = p["fitted"]["starts"]["result"]
    assert s["alerting"] == 0 and s["starts"] == len(starts)
    m = p["fitted"]["result"]["margin"]
    assert m == s["margin"] > m0
    assert p["settings"]["scoring"]["threshold"] == pytest.approx(0.05 * m, abs=1e-6)
    # the safety factor: the quiet margin is one 1.1x grid step below, and the step below
    # that lets a start alarm
    i = GRID.index(m)
    assert alerting(model, starts, GRID[i - 1]) == 0
    assert alerting(model, starts, GRID[i - 2]) >= 1
    assert "first 8 h" in p["fitted"]["rule"] and len(p["fitted"]["starts"]["data"]) == 4


def test_the_start_quantile_lets_the_rarest_start_alarm(model, data):
    steady, starts = data
    every = fit_policy(model, steady, SETTINGS, 0, "test", starts=starts,
                       start_quantile=1.0, safety=1.0)
    most = fit_policy(model, steady, SETTINGS, 0, "test", starts=starts,
                      start_quantile=0.75, safety=1.0)
    m_every = every["fitted"]["starts"]["result"]["margin"]
    m_most = most["fitted"]["starts"]["result"]["margin"]
    assert m_most < m_every
    # one of four starts may alarm at the 75 % quantile: the one that settles furthest
    assert most["fitted"]["starts"]["result"]["alerting"] == 1
    assert alerting(model, starts[:3], m_most) == 0
    assert alerting(model, starts[3:], m_most) == 1


def test_starts_shorter_than_the_learning_period_are_refused(model, data):
    _, starts = data
    with pytest.raises(ValueError, match="start recording"):
        fit_policy(model, data[0], SETTINGS, 400, "test", starts=starts)


def test_short_recordings_are_named_and_left_out_of_the_fitted_data(model, data, tmp_path, caplog):
    steady, _ = data
    short = recording(tmp_path / "short.csv", 1, seed=99)         # 20 rows
    policy = fit_policy(model, [steady[0], short], SETTINGS, 10, "test")
    assert [d["path"] for d in policy["fitted"]["data"]] == ["steady0.csv"]
    assert f"{short}: 20 rows, not more than twice the learning period (10 rows): not used" \
        in caplog.text
    with pytest.raises(ValueError, match=r"more than twice the learning period's rows \(20\)"):
        fit_policy(model, [short], SETTINGS, 10, "test")


def test_no_margin_on_the_grid_is_an_error_not_a_policy(model, tmp_path):
    # every row far off the model's range: even the grid's top margin leaves an alert open
    rng = np.random.default_rng(5)
    v = rng.normal(0, 1.0, (400, len(CH)))
    v[100:] += 1e4
    with pytest.raises(ValueError, match=f"no margin up to {GRID[-1]:g} meets the rule"):
        fit_policy(model, [write(tmp_path / "off.csv", v)], SETTINGS, 40, "test")


@pytest.mark.parametrize("key", ["calibration.margin", "calibration.samples",
                                 "calibration.enabled", "scoring.threshold"])
def test_settings_the_fit_sets_itself_are_refused(model, data, key):
    sec, name = key.split(".")
    with pytest.raises(ValueError, match=f"--set {key}: "):
        fit_policy(model, data[0][:1], {sec: {name: 1}}, 10, "test")


def test_the_refinement_margin_is_fitted_after_the_threshold_margin(model, data):
    """calibration.refine (agent/refine.py): the threshold margin is fitted as without it,
    then the refinement's, from 1 up, adding no alert at any learning start (every
    after_s: a day here) of the normal recordings."""
    refine = {"after_s": 24 * 3600.0, "span_s": 60 * 3600.0}    # 1,200 windows at 3 min
    plain = fit_policy(model, data[0][:2], SETTINGS, 40, "test")
    both = fit_policy(model, data[0][:2], {**SETTINGS, "calibration": {"refine": refine}},
                      40, "test")
    cal = both["settings"]["calibration"]
    assert cal["margin"] == plain["settings"]["calibration"]["margin"]
    assert cal["refine"]["margin"] >= 1.0 and cal["refine"]["after_s"] == refine["after_s"]
    r = both["fitted"]["refine"]["result"]
    assert r["margin"] == cal["refine"]["margin"] and r["worse"] == 0
    # a day apart while 2 h of learning, a day and 2 x 60 h of running fit in 168 h
    assert r["starts"] == 2 * 1
    assert "refinement's margin" in both["fitted"]["rule"]
    assert all(t["margin"] >= 1.0 for t in both["fitted"]["refine"]["trials"])


def test_a_refinement_margin_given_is_refused(model, data):
    with pytest.raises(ValueError, match="its margin is what fit-policy fits"):
        fit_policy(model, data[0][:1], {"calibration": {"refine": {"margin": 1.2}}}, 10, "test")


def test_learning_starts_are_every_after_s_while_an_hour_of_running_follows():
    ts = np.arange(0.0, 4 * 3600.0, 60.0)           # 4 h at one sample a minute
    seg = Segment(Path("x.csv"), ts, np.zeros((len(ts), 2)))
    starts = learning_starts([seg], 30, 1800.0, 3600.0)      # 30 min of learning
    # every 30 min up to 120: then 30 min of learning and an hour of running end at 210
    # of the 239 minutes; from 150 they would not fit
    assert [s.ts[0] for s in starts] == [0.0, 1800.0, 3600.0, 5400.0, 7200.0]
    assert all(len(s.ts) == len(s.values) for s in starts)
    assert len(learning_starts([seg], 30, 1800.0, 3 * 3600.0)) == 1    # from 0 only


def test_a_recording_too_short_to_reach_the_refinement_is_refused(model, data):
    # 168 h recordings: learning 2 h, then a day before the span and 3 days of it
    refine = {"after_s": 24 * 3600.0, "span_s": 72 * 3600.0}
    with pytest.raises(ValueError, match="too short to fit the refinement's margin"):
        fit_policy(model, data[0][:1], {**SETTINGS, "calibration": {"refine": refine}}, 40,
                   "test")


def test_safety_rounds_up_one_grid_step_not_two():
    i = GRID.index(1.331)
    assert GRID[rounded_up(i, 1.1)] == 1.464        # 1.331 x 1.1 = 1.4641, a hair above
    assert all(rounded_up(k, 1.1) == k + 1 for k in range(len(GRID) - 1))


def test_a_refit_ignores_the_policy_it_replaces(model, data, tmp_path):
    """The trials run the given settings alone, not over the model's current policy: the
    written policy holds only them, so its margin must be the one fitted for them."""
    import shutil

    from agent.model_meta import load_meta, meta_path_for
    steady = data[0][:1]
    plain = fit_policy(model, steady, SETTINGS, 40, "test")
    old = tmp_path / "old.onnx"
    shutil.copy(model, old)
    meta = load_meta(model)
    # settings that would change the margin the trials find if they ran over them
    meta.policy = {"settings": {"scoring": {"smoothing": 30},
                                "alerts": {"open_k": 1, "open_n": 1, "close_m": 50}}}
    meta.save(meta_path_for(old))
    refit = fit_policy(str(old), steady, SETTINGS, 40, "test")
    assert refit["settings"] == plain["settings"]
    assert refit["fitted"]["result"] == plain["fitted"]["result"]


def test_recordings_with_labelled_faults_are_refused(model, tmp_path):
    rng = np.random.default_rng(3)
    f = write(tmp_path / "faulty.csv", rng.normal(0, 1.0, (200, len(CH))))
    d = pd.read_csv(f)
    d["anomaly"] = [0] * 150 + [1] * 50
    d.to_csv(f, index=False)
    with pytest.raises(ValueError, match=r"faulty.csv: 50 row\(s\) labelled anomalous \(first "
                                         r"at row 151\); fit a policy on normal recordings only"):
        fit_policy(model, [f], SETTINGS, 40, "test")


def test_a_run_condition_is_fitted_with_and_not_written_into_the_policy(model, tmp_path):
    """Training audit (twenty-second session): `--set running.*` was written into the
    policy, which then no model load accepted; recordings with stops could not be fitted."""
    from agent.jobs import detection_config
    from agent.model_meta import load_meta
    from agent.policy_fit import parse_settings
    from agent.policy_store import write_policy
    rng = np.random.default_rng(5)
    v = rng.normal(0, 1.0, (7 * 24 * HOUR, len(CH)))
    v[:, 0] += 5.0                                    # a: a motor current while running
    for day in range(7):                              # every night, 8 hours stopped
        night = slice((day * 24 + 16) * HOUR, (day + 1) * 24 * HOUR)
        v[night] = [0.0, 25.0]
    rec = write(tmp_path / "week.csv", v)
    with pytest.raises(ValueError, match="recordings that hold stops need the plant's run"):
        fit_policy(model, [rec], {}, 0, "test")
    settings = parse_settings(["running.channel=a", "running.above=2"])
    policy = fit_policy(model, [rec], settings, 0, "test")
    assert "running" not in policy["settings"]
    assert policy["fitted"]["running"] == {"channel": "a", "above": 2}
    copy = tmp_path / "m.onnx"
    copy.write_bytes(Path(model).read_bytes())
    Path(str(copy) + ".json").write_text(Path(model + ".json").read_text())
    write_policy(str(copy), policy)
    meta = load_meta(str(copy))                       # loads: the policy holds no `running`
    assert detection_config(meta).running is None


def test_outages_are_no_hours_of_running():
    """Training audit (twenty-second session): fit-policy and evaluate counted three 6-hour
    historian outages in 96 hours as running, a fifth more alerts allowed per day."""
    from agent.jobs import long_run
    ts = np.arange(0, 96 * 3600, 10.0)
    up = np.ones(len(ts), bool)
    for k in range(3):
        up[(ts >= (10 + 30 * k) * 3600) & (ts < (16 + 30 * k) * 3600)] = False
    pred = np.zeros(up.sum(), np.int8)
    pred[100:110] = 1
    r = long_run(ts[up], pred)
    assert r["hours"] == pytest.approx(78.0, abs=0.02) and r["alerts"] == 1
    assert r["alerts_per_day"] == pytest.approx(24 / 78.0, rel=1e-3)
