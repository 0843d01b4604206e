"""Tennessee Eastman benchmark: the CSV converter, the PCA references, and (with the
`[bench]` extra) a tiny simulated run trained and evaluated end to end."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from export.recipes import tep_data
from export.reference import fit_pca

CHANNELS = ["measurement.b", "measurement.a", "implemented_action.c"]


def tep_like_frame(hours: float = 2.0) -> pd.DataFrame:
    """A frame shaped like tep-studio's `to_frame()`: times accumulated in float (so not
    exact multiples of 3 min), channels in a different order, extra columns."""
    n = int(round(hours / 0.05))
    time = np.full(n, 0.05).cumsum() - 0.04     # 0.01, 0.06, ... with float drift
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "run_id": "x", "time": time,
        "implemented_action.c": rng.normal(size=n), "measurement.a": rng.normal(size=n),
        "requested_action.c": rng.normal(size=n), "measurement.b": np.arange(n, dtype=float)})


def test_converter_orders_channels_and_labels_from_the_onset():
    raw = tep_like_frame()
    out = tep_data.to_labeled_frame(raw, CHANNELS, onset_h=1.0)
    assert list(out.columns) == ["datetime", *CHANNELS, "anomaly"]
    np.testing.assert_array_equal(out["measurement.a"], raw["measurement.a"])
    np.testing.assert_array_equal(out["measurement.b"], raw["measurement.b"])
    # samples at 0.96 h and 1.01 h: the first at or after 1 h is labeled, nothing before
    first = int(np.argmax(out["anomaly"].to_numpy()))
    assert out["datetime"][first] == "2024-01-01T01:00:36Z"
    assert out["datetime"][first - 1] == "2024-01-01T00:57:36Z"
    assert out["anomaly"][:first].sum() == 0 and out["anomaly"][first:].all()
    assert out["datetime"][0] == "2024-01-01T00:00:36Z"


def test_converter_fault_free_is_all_normal_and_refuses_missing_channels():
    out = tep_data.to_labeled_frame(tep_like_frame(), CHANNELS, onset_h=None)
    assert out["anomaly"].sum() == 0
    with pytest.raises(ValueError, match="measurement.zz"):
        tep_data.to_labeled_frame(tep_like_frame(), [*CHANNELS, "measurement.zz"], None)


def test_seed_sets_are_disjoint_and_complete():
    seeds = {name: {s.seed for s in specs} for name, specs in tep_data.SETS.items()}
    assert set(seeds) == {"train", "val", "test", "months"}
    for a, b in itertools.combinations(seeds, 2):
        assert not seeds[a] & seeds[b], (a, b)
    assert {s.fault for s in tep_data.TRAIN} == {tep_data.FAULT_FREE}
    test_faults = [s for s in tep_data.TEST if s.fault != tep_data.FAULT_FREE]
    assert len({s.fault for s in test_faults}) == 28
    assert min(sum(s.fault == f for s in test_faults) for f in tep_data.FAULTS) >= 3
    week = [s for s in tep_data.TEST if s.fault == tep_data.FAULT_FREE and s.hours >= 168]
    assert len(week) >= 3
    assert sum(s.hours for s in tep_data.TRAIN) / 24 >= 5      # several simulated days
    assert [s.fault for s in tep_data.MONTHS] == [tep_data.FAULT_FREE] * 3
    assert min(s.hours for s in tep_data.MONTHS) >= 90 * 24    # a quarter of running each


def test_train_and_val_hold_many_fresh_starts_on_their_own_seeds():
    # a plant settles for ~10 h after a start: the models learn it from TRAIN's starts,
    # the start rule is fitted on VAL's, and no start seed is reused across sets
    for specs, starts in ((tep_data.TRAIN, tep_data.TRAIN_STARTS), (tep_data.VAL, tep_data.STARTS)):
        fault_free = [s for s in specs if s.fault == tep_data.FAULT_FREE]
        assert len(fault_free) >= 40
        assert {s.seed for s in fault_free if s.hours == tep_data.DAY_H} == set(starts)
    assert not set(tep_data.TRAIN_STARTS) & set(tep_data.STARTS)
    assert len({s.name for s in tep_data.TRAIN}) == len(tep_data.TRAIN)


# ------------------------------------------------------------------ PCA references
def correlated(n: int, rng: np.random.Generator) -> np.ndarray:
    """Ten channels driven by three latent factors plus a little independent noise."""
    mix = np.random.default_rng(42).normal(size=(3, 10))
    return rng.normal(size=(n, 3)) @ mix + 0.1 * rng.normal(size=(n, 10)) + 50.0


def test_pca_normal_rows_stay_under_the_limits_at_about_one_percent():
    rng = np.random.default_rng(1)
    ref = fit_pca([correlated(4000, rng), correlated(4000, rng)], [f"c{i}" for i in range(10)])
    assert ref.components == 3 and ref.explained >= 0.90
    a = ref.alarms(correlated(20000, np.random.default_rng(2)))
    assert 0.003 < a["t2"].mean() < 0.02 and 0.003 < a["q"].mean() < 0.02


def test_pca_a_shift_off_the_correlation_trips_q_and_along_it_trips_t2():
    rng = np.random.default_rng(3)
    ref = fit_pca([correlated(6000, rng)], [f"c{i}" for i in range(10)])
    x = correlated(500, np.random.default_rng(4))
    # one channel moving on its own breaks the correlation: the residual (Q) sees it
    off = x.copy()
    off[:, 4] += 3.0
    a = ref.alarms(off)
    assert a["q"].mean() > 0.95
    # a large move along the first principal direction stays in the model's subspace
    along = x + 6 * np.sqrt(ref.eigenvalues[0]) * ref.loadings[:, 0] * ref.std
    a = ref.alarms(along)
    assert a["t2"].mean() > 0.95 and a["q"].mean() < 0.05


def test_pca_nan_rows_never_alarm_and_short_data_is_refused():
    rng = np.random.default_rng(5)
    ref = fit_pca([correlated(2000, rng)], [f"c{i}" for i in range(10)])
    x = correlated(10, rng)
    x[3, 2] = np.nan
    x[3, 5] = 1e6
    assert ref.alarms(x)["either"][3] == 0
    with pytest.raises(ValueError, match="held-out rows"):
        fit_pca([correlated(20, rng)], [f"c{i}" for i in range(10)])


# ------------------------------------------------------------------ with tep-studio
NO_TEP = ("tep-studio is not installed or its C extension did not build: "
          "pip install -e '.[bench]' (it compiles the simulator: needs a C compiler)")


@pytest.fixture(scope="module")
def tep_runs(tmp_path_factory):
    pytest.importorskip("tep_studio.simulation.native", reason=NO_TEP)
    out = tmp_path_factory.mktemp("tep")
    specs = [tep_data.RunSpec("train", tep_data.FAULT_FREE, 901, 6.0),
             tep_data.RunSpec("test", "idv_06", 902, 12.0)]
    return out, [tep_data.write_run(s, out) for s in specs]


def test_tep_run_has_classic52_channels_labels_and_is_reproducible(tep_runs, tmp_path):
    out, rows = tep_runs
    from tep_studio.simulation.benchmark import feature_columns
    channels = feature_columns("classic52")
    assert len(channels) == 52
    normal = pd.read_csv(out / rows[0]["file"])
    faulty = pd.read_csv(out / rows[1]["file"])
    assert list(faulty.columns) == ["datetime", *channels, "anomaly"]
    assert normal["anomaly"].sum() == 0 and rows[0]["rows"] == len(normal) == 120
    onset = pd.to_datetime(faulty["datetime"]) >= pd.Timestamp("2024-01-01T08:00:00Z")
    np.testing.assert_array_equal(faulty["anomaly"].to_numpy() == 1, onset.to_numpy())
    again = tep_data.write_run(tep_data.RunSpec("test", "idv_06", 902, 12.0), tmp_path)
    assert again["sha256"] == rows[1]["sha256"]


def test_tep_tiny_model_trains_and_evaluates_through_the_pipeline(tep_runs, tmp_path):
    pytest.importorskip("torch")
    from agent.evaluate import evaluate
    from export.cli import main
    out, rows = tep_runs
    normal, faulty = out / rows[0]["file"], out / rows[1]["file"]
    model = tmp_path / "tep.onnx"
    assert main(["train", "--model", "AutoEncoder_ad", "--data", str(normal), "--window", "8",
                 "--epochs", "3", "--val-frac", "0.25", "--out", str(model)]) == 0
    report = evaluate([faulty], str(model), calibration_rows=None, by="label",
                      overrides={"buffer": {"gap_reset_s": None}})
    labels = pd.read_csv(faulty)["anomaly"].to_numpy()
    assert report["tp"] + report["fn"] == labels.sum()
    assert report["fp"] + report["tn"] == len(labels) - labels.sum()
    # IDV 6 (loss of the A feed) moves the plant far from anything normal within hours
    assert report["recall"] > 0.5


def _long_normal():
    import benchmark_module
    return benchmark_module.load("long_normal")


def test_long_normal_counts_alerts_by_month_and_the_longest():
    ln = _long_normal()
    day = 86400.0
    ts = np.arange(0.0, 65 * day, 3600.0)            # 65 days, one row an hour
    pred = np.zeros(len(ts), np.int8)
    pred[10:13] = 1                                  # month 1: 3 h
    pred[24 * 31:24 * 31 + 2] = 1                    # month 2: 2 h
    pred[24 * 40:24 * 40 + 30] = 1                   # month 2: 30 h
    pred[-5:] = 1                                    # month 3, open at the end: 4 h so far
    fig = ln.alert_figures(ts, pred)
    assert fig["alerts"] == 4
    assert fig["alerts_by_month"] == [1, 2, 1]
    assert fig["longest_alert_h"] == 30.0
    assert fig["alert_open_share"] == pytest.approx(40 / len(ts))
    runs = [fig, ln.alert_figures(ts, np.zeros(len(ts), np.int8))]
    p = ln.pooled(runs)
    assert p["alerts_by_month"] == [1, 2, 1] and p["alerts"] == 4
    assert p["alerts_per_day"] == pytest.approx(4 / (2 * fig["hours"] / 24))
