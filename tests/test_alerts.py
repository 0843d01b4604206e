"""Alert hysteresis: k-of-n opening, m-to-close, cooldown, rate-limited updates, block invariance."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.alerts import AlertTracker
from agent.timestamps import iso_utc
from agent.config import AlertConfig
from agent.contract import top_channels

CH = ["a", "b", "c"]
MODEL = {"name": "tiny", "sha256": "f" * 64, "ep": "CPUExecutionProvider"}
T0 = 1_700_000_000.0
THR = 1.0


def tracker(**cfg):
    return AlertTracker("node1", "pump", AlertConfig(**cfg), CH, MODEL)


def feed(labels, cfg=None, ts=None, scores=None, err=None):
    """Scores 2.0 for label 1, 0.1 for label 0, one window per second; one block."""
    labels = np.asarray(labels)
    n = len(labels)
    ts = T0 + np.arange(n, dtype=float) if ts is None else ts
    scores = np.where(labels == 1, 2.0, 0.1) if scores is None else scores
    err = np.tile([1.0, 3.0, 0.0], (n, 1)) if err is None else err
    t = tracker(**(cfg or {}))
    return t, t.update(ts, scores, THR, err)


def kinds(events):
    return [e["type"] for e in events]


def test_k_of_n_opens_and_start_is_first_anomalous_window():
    cfg = dict(open_k=3, open_n=5, close_m=3)
    t, ev = feed([1, 0, 1, 0, 0, 1, 0, 0, 0], cfg)       # never 3 of 5
    assert ev == [] and t.state == "normal"
    t, ev = feed([0, 1, 0, 1, 0, 1, 0], cfg)             # 3 of 5 at index 5
    assert kinds(ev) == ["new"] and t.state == "anomaly"
    e = ev[0]
    assert e["start"] == iso_utc(T0 + 1) and e["end"] is None
    assert e["id"] == f"node1:pump:{int((T0 + 1) * 1000)}"
    np.testing.assert_array_equal(t.labels, [0, 1, 0, 1, 0, 1, 0])
    assert t.labels.dtype == np.int8


def test_event_schema_and_json():
    t, ev = feed([1, 1, 1], dict(open_k=2, open_n=3))
    e = ev[0]
    assert set(e) == {"schema", "type", "id", "node", "stream", "start", "end", "score",
                      "peak_score", "threshold", "top_channels", "model", "acknowledged",
                      "standing"}
    assert e["acknowledged"] is False and e["standing"] is False
    assert e["schema"] == 1 and e["node"] == "node1" and e["stream"] == "pump"
    assert e["start"] == "2023-11-14T22:13:20.000Z"
    assert e["score"] == 2.0 and e["peak_score"] == 2.0 and e["threshold"] == THR
    assert e["top_channels"] == [{"name": "b", "share": 0.75}, {"name": "a", "share": 0.25},
                                 {"name": "c", "share": 0.0}]
    assert e["model"] == MODEL
    json.dumps(e, allow_nan=False)


def test_closes_after_m_consecutive_normal_windows():
    cfg = dict(open_k=1, open_n=1, close_m=3, update_interval_s=1e9)
    labels = [1, 0, 0, 1, 0, 0, 0, 0]
    t, ev = feed(labels, cfg)
    assert kinds(ev) == ["new", "end"] and t.state == "normal"
    end = ev[1]
    # the run 4,5,6 closes it at index 6; the signal was back at index 4
    assert end["end"] == iso_utc(T0 + 4) and end["start"] == iso_utc(T0)
    assert end["id"] == ev[0]["id"] and end["score"] == 0.1 and end["peak_score"] == 2.0


def test_cooldown_blocks_new_alerts_then_lets_them_through():
    cfg = dict(open_k=1, open_n=1, close_m=1, cooldown_s=5.0, update_interval_s=1e9)
    #        0  1  2  3  4  5  6  7  8
    labels = [1, 0, 1, 1, 0, 0, 1, 1, 0]
    t, ev = feed(labels, cfg)
    # end at index 1 (t=1): nothing may open before t=6
    assert kinds(ev) == ["new", "end", "new", "end"]
    assert ev[2]["start"] == iso_utc(T0 + 6)
    _, ev0 = feed(labels, dict(cfg, cooldown_s=0.0))
    assert kinds(ev0) == ["new", "end", "new", "end", "new", "end"]


def test_updates_are_rate_limited_by_sample_time():
    cfg = dict(open_k=1, open_n=1, close_m=5, update_interval_s=10.0)
    n = 41   # updates at t=10, 20, 30, 40 (a window exactly one interval later is due)
    scores = np.full(n, 2.0)
    scores[17] = 9.0
    t, ev = feed(np.ones(n, int), cfg, scores=scores)
    assert kinds(ev) == ["new", "update", "update", "update", "update"]
    assert [e["score"] for e in ev] == [2.0] * 5
    assert [e["peak_score"] for e in ev] == [2.0, 2.0, 9.0, 9.0, 9.0]
    assert len({e["id"] for e in ev}) == 1
    # irregular timestamps: updates follow sample time, not window count
    ts = T0 + np.array([0, 3, 9.9, 10, 10.5, 25, 26], float)
    _, ev = feed(np.ones(7, int), cfg, ts=ts)
    assert kinds(ev) == ["new", "update", "update"]


def test_windows_of_a_closed_alert_do_not_reopen_it():
    # close_m < open_n: right after an end, the last n windows still hold k anomalies
    cfg = dict(open_k=2, open_n=6, close_m=2, update_interval_s=1e9)
    t, ev = feed([1, 1, 1, 0, 0, 1, 0, 0, 0], cfg)
    assert kinds(ev) == ["new", "end"]
    t, ev = feed([1, 1, 1, 0, 0, 1, 1, 0, 0], cfg)
    assert kinds(ev) == ["new", "end", "new", "end"]
    assert ev[2]["start"] == iso_utc(T0 + 5) and ev[0]["id"] != ev[2]["id"]


def test_nan_scores_are_normal_and_events_stay_json():
    cfg = dict(open_k=1, open_n=1, close_m=2)
    scores = np.array([np.nan, 2.0, np.nan, np.nan, 0.1])
    t, ev = feed(np.zeros(5), cfg, scores=scores)
    assert kinds(ev) == ["new", "end"] and list(t.labels) == [0, 1, 0, 0, 0]
    assert ev[1]["score"] is None and ev[1]["peak_score"] == 2.0
    for e in ev:
        json.dumps(e, allow_nan=False)


def test_block_shape_errors():
    t = tracker()
    with pytest.raises(ValueError, match="err"):
        t.update(np.zeros(3), np.zeros(3), THR, np.zeros((3, 2)))
    assert t.update(np.zeros(0), np.zeros(0), THR, np.zeros((0, 3))) == []


# ------------------------------------------------------------ reference model
def reference(ts, scores, err, cfg: AlertConfig):
    """A plain per-window implementation of the documented rules."""
    lab = [int(s >= THR) for s in scores]
    ev, state, cool = [], "normal", -np.inf
    for i, s in enumerate(scores):
        if state == "normal":
            w0 = max(0, i - cfg.open_n + 1)
            if lab[i] and sum(lab[w0:i + 1]) >= cfg.open_k and ts[i] >= cool:
                onset = next(j for j in range(w0, i + 1) if lab[j])
                state, start, run, last_up = "anomaly", ts[onset], 0, ts[i]
                peak, pidx = -np.inf, None
                for j in range(onset, i + 1):
                    if scores[j] > peak:
                        peak, pidx = scores[j], j
                ev.append(("new", start, None, s, peak, pidx))
            continue
        if not np.isnan(s) and s > peak:
            peak, pidx = s, i
        if lab[i]:
            run = 0
        else:
            if run == 0:
                since = ts[i]
            run += 1
        if run >= cfg.close_m:
            ev.append(("end", start, since, s, peak, pidx))
            state, cool = "normal", ts[i] + cfg.cooldown_s
            for j in range(max(0, i - cfg.open_n + 1), i + 1):
                lab[j] = 0
        elif ts[i] - last_up >= cfg.update_interval_s:
            last_up = ts[i]
            ev.append(("update", start, None, s, peak, pidx))
    return ev


def as_tuples(events):
    out = []
    for e in events:
        out.append((e["type"], e["start"], e["end"], e["score"], e["peak_score"], e["top_channels"]))
    return out


def ref_tuples(ref, err, k):
    out = []
    for typ, start, end, s, peak, pidx in ref:
        out.append((typ, iso_utc(start), None if end is None else iso_utc(end),
                    None if np.isnan(s) else float(s), float(peak),
                    top_channels(err[pidx], CH, k)))
    return out


@settings(max_examples=150, deadline=None)
@given(
    labels=st.lists(st.sampled_from([0, 1, 1, 2]), min_size=1, max_size=120),
    k_n=st.tuples(st.integers(1, 5), st.integers(0, 4)),
    close_m=st.integers(1, 6),
    cooldown=st.sampled_from([0.0, 2.0, 7.5]),
    interval=st.sampled_from([0.5, 3.0, 1e9]),
    cuts=st.lists(st.integers(0, 120), max_size=12),
    seed=st.integers(0, 2**16),
)
def test_blocks_equal_one_by_one_equal_reference(labels, k_n, close_m, cooldown, interval, cuts, seed):
    k, extra = k_n
    cfg = AlertConfig(open_k=k, open_n=k + extra, close_m=close_m, cooldown_s=cooldown,
                      update_interval_s=interval, top_channels=2)
    rng = np.random.default_rng(seed)
    n = len(labels)
    # half-second steps are exact in float64, so "exactly one interval later" happens
    ts = T0 + np.cumsum(rng.choice([0.5, 1.0, 1.5, 4.0], n))
    lab = np.array(labels)
    # label 2 = NaN score; anomalous scores vary (with ties) so peaks move around
    scores = np.where(lab == 1, rng.choice([1.0, 2.0, 3.0], n), rng.uniform(0.0, 0.99, n))
    scores[lab == 2] = np.nan
    err = rng.random((n, 3))

    whole = AlertTracker("node1", "pump", cfg, CH, MODEL)
    ev_whole = whole.update(ts, scores, THR, err)

    single = AlertTracker("node1", "pump", cfg, CH, MODEL)
    ev_single, masks = [], []
    for i in range(n):
        ev_single += single.update(ts[i:i + 1], scores[i:i + 1], THR, err[i:i + 1].copy())
        masks.append(single.open_mask.copy())
    # a window at a time (its own path while open) marks the same windows "alert open"
    assert np.concatenate(masks).tolist() == whole.open_mask.tolist()

    pieces = AlertTracker("node1", "pump", cfg, CH, MODEL)
    ev_pieces = []
    bounds = [0] + sorted(c for c in cuts if c < n) + [n]
    for a, b in zip(bounds, bounds[1:]):
        ev_pieces += pieces.update(ts[a:b], scores[a:b], THR, err[a:b])

    assert ev_whole == ev_single == ev_pieces
    assert whole.state == single.state == pieces.state
    assert as_tuples(ev_whole) == ref_tuples(reference(ts, scores, err, cfg), err, 2)

    # ids: one per alert lifetime, distinct between alerts; events in lifecycle order
    open_id = None
    seen = set()
    for e in ev_whole:
        if e["type"] == "new":
            assert open_id is None and e["id"] not in seen
            open_id = e["id"]
            seen.add(open_id)
        else:
            assert e["id"] == open_id
            if e["type"] == "end":
                open_id = None
    assert (whole.state == "anomaly") == (open_id is not None)


def test_close_ends_the_open_alert_once():
    t, ev = feed([1, 1, 1, 1])
    assert kinds(ev) == ["new"] and t.state == "anomaly"
    end = t.close(T0 + 10, THR, "stopped")
    assert end["type"] == "end" and end["id"] == ev[0]["id"] and end["reason"] == "stopped"
    assert end["end"] == iso_utc(T0 + 10) and t.state == "normal"
    assert t.close(T0 + 11, THR, "stopped") is None


def test_times_no_calendar_can_show_do_not_raise():
    assert iso_utc(1.7e15) is None and iso_utc(-1e20) is None and iso_utc(float("nan")) is None
    t, ev = feed([1, 1, 1, 1], ts=1.7e15 + np.arange(4.0))
    assert kinds(ev) == ["new"] and ev[0]["start"] is None
