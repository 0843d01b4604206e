"""Score definition, channel shares, smoothing, scaling and threshold (agent.contract)."""
from __future__ import annotations

import numpy as np
import pytest

from agent.contract import MIN_THRESHOLD, StreamScaler, fit_scaler, fit_threshold, score_windows, top_channels
from agent.model_meta import SCORE_DEFINITION
from agent.scoring import Smoother

def test_score_definition_by_hand():
    assert SCORE_DEFINITION == "mse_last_step_scaled"
    x = np.zeros((2, 3, 2), np.float32)
    recon = np.zeros_like(x)
    # Older time steps must not count: large errors there, none of them in the score.
    recon[:, :2, :] = 100.0
    x[0, -1] = [1.0, 2.0]
    recon[0, -1] = [1.5, 0.0]      # errors 0.25, 4.0 -> mean 2.125
    x[1, -1] = [-1.0, 0.5]
    recon[1, -1] = [-1.0, 0.5]     # perfect
    scores, err = score_windows(x, recon)
    assert scores.dtype == np.float64 and err.dtype == np.float64
    np.testing.assert_allclose(err, [[0.25, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(scores, [2.125, 0.0])


def test_score_shape_mismatch():
    with pytest.raises(ValueError, match="must both be"):
        score_windows(np.zeros((1, 4, 2), np.float32), np.zeros((1, 4, 3), np.float32))


def test_top_channels_shares():
    out = top_channels(np.array([1.0, 6.0, 0.0, 3.0]), ["a", "b", "c", "d"], 3)
    assert out == [{"name": "b", "share": 0.6}, {"name": "d", "share": 0.3}, {"name": "a", "share": 0.1}]
    assert top_channels(np.array([1.0, 2.0]), ["a", "b"], 5) == [
        {"name": "b", "share": 0.6667}, {"name": "a", "share": 0.3333}]
    assert top_channels(np.zeros(3), ["a", "b", "c"], 2) == []
    assert top_channels(np.array([np.nan, 1.0]), ["a", "b"], 2) == []


def test_smoother_blocks_equal_one_by_one():
    rng = np.random.default_rng(3)
    s = rng.random(50)
    whole = Smoother(4).update(s)
    sm = Smoother(4)
    pieces = np.concatenate([sm.update(s[i:j]) for i, j in [(0, 1), (1, 2), (2, 9), (9, 9), (9, 50)]])
    np.testing.assert_allclose(whole, pieces, rtol=1e-12)
    # reference: mean of the last (up to) 4 scores
    ref = [s[max(0, i - 3):i + 1].mean() for i in range(50)]
    np.testing.assert_allclose(whole, ref, rtol=1e-12)
    np.testing.assert_array_equal(Smoother(1).update(s), s)


def test_stream_scaler():
    sc = StreamScaler(np.array([1.0, 10.0]), np.array([2.0, 0.5]))
    out = sc.apply(np.array([[3.0, 10.0], [np.nan, 9.0]], np.float32))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[1.0, 0.0], [np.nan, -2.0]])
    with pytest.raises(ValueError, match="std must be > 0"):
        StreamScaler(np.zeros(2), np.array([1.0, 0.0]))


def test_a_moved_scaler_scales_as_a_new_one_with_that_mean():
    sc = StreamScaler(np.array([1.0, 10.0]), np.array([2.0, 0.5]))
    moved = sc.moved(np.array([1.5, 9.25]))
    fresh = StreamScaler(np.array([1.5, 9.25]), np.array([2.0, 0.5]))
    x = np.array([[3.0, 10.0], [-1.0, 9.0]], np.float32)
    assert moved.apply(x).tobytes() == fresh.apply(x).tobytes()
    assert sc.apply(x).tobytes() != moved.apply(x).tobytes()      # the original is untouched
    np.testing.assert_array_equal(sc.mean, [1.0, 10.0])


def test_fit_scaler_takes_each_channels_own_values_and_floors_flat_channels():
    rng = np.random.default_rng(0)
    raw = np.column_stack([rng.normal(5, 2, 500), np.full(500, 32.0)])   # channel 2 is flat
    raw[10, 0] = np.nan
    raw[20, 1] = np.inf
    raw[30] = [25.0, np.nan]        # a glitch in a sample missing its other channel counts
    sc = fit_scaler(raw, model_std=np.array([1.0, 4.0]), std_floor=0.1)
    first = np.delete(raw[:, 0], 10)
    assert first[29] == 25.0
    assert sc.mean[0] == pytest.approx(first.mean())
    assert sc.std[0] == pytest.approx(first.std())
    assert sc.mean[1] == 32.0 and sc.std[1] == pytest.approx(0.4)   # 0.1 x model std
    # a later wobble of 0.2 on the flat channel is half a std, not infinity
    assert sc.apply(np.array([[5.0, 32.2]], np.float32))[0, 1] == pytest.approx(0.5, rel=1e-5)
    assert fit_scaler(raw, np.array([1.0, 4.0]), std_floor=0.0).std[1] == 4.0
    with pytest.raises(ValueError, match="at least 2"):
        fit_scaler(np.full((5, 2), np.nan), np.ones(2), 0.1)
    one = np.ones((5, 2))
    one[1:, 1] = np.nan
    with pytest.raises(ValueError, match="got 1 of channel 1"):
        fit_scaler(one, np.ones(2), 0.1)
    with pytest.raises(ValueError, match="do not match"):
        fit_scaler(raw, np.ones(3), 0.1)


def test_fit_scaler_std_scale_widens_before_the_floor():
    rng = np.random.default_rng(1)
    raw = np.column_stack([rng.normal(0, 1, 400), np.full(400, 7.0)])
    sc = fit_scaler(raw, np.array([1.0, 1.0]), std_floor=0.1, std_scale=np.array([3.0, 5.0]))
    assert sc.std[0] == pytest.approx(3.0 * raw[:, 0].std())
    assert sc.std[1] == pytest.approx(0.1)      # 0 x 5 is still floored, not scaled up
    with pytest.raises(ValueError, match="std_scale"):
        fit_scaler(raw, np.ones(2), 0.1, std_scale=np.ones(3))


def test_fit_threshold():
    s = np.arange(1, 101, dtype=np.float64)
    assert fit_threshold(s, 0.5, 2.0) == pytest.approx(np.quantile(s, 0.5) * 2.0)
    assert fit_threshold(np.append(s, [np.nan, np.inf]), 0.5, 2.0) == pytest.approx(101.0)
    assert fit_threshold(np.zeros(10), 0.99, 1.5) == MIN_THRESHOLD > 0
    with pytest.raises(ValueError, match="no finite"):
        fit_threshold(np.array([np.nan]), 0.9, 1.0)


def test_smoother_one_score_at_a_time_sums_its_window_oldest_first():
    """The one-score path (Python floats) sums the window's scores oldest first, as a
    running sum from zero adds them: not just close, equal, NaN included."""
    rng = np.random.default_rng(5)
    s = rng.random(300) * 10.0 ** rng.integers(-3, 4, 300)
    s[[40, 41, 120]] = np.nan
    for k in (2, 3, 10):
        sm = Smoother(k)
        got = np.concatenate([sm.update(s[i:i + 1]) for i in range(len(s))])
        for i in range(k - 1, len(s)):
            c = np.add.accumulate(np.concatenate([[0.0], s[i - k + 1:i + 1]]))
            want = (c[k:] - c[:1]) / k
            assert got[i:i + 1].tobytes() == want.tobytes()


@pytest.mark.parametrize("k", [2, 5, 10])
def test_smoothing_gives_the_same_bits_however_scores_are_chunked(k):
    """A daemon smooths one score (or a few) at a time, a file job 192 at a time: each
    output sums its own window oldest first, so both give the same bits; a NaN spoils only
    the windows that hold it."""
    rng = np.random.default_rng(k)
    scores = rng.gamma(1.0, 1.0, 700) * 10.0 ** rng.integers(-3, 4, 700)
    scores[300] = np.nan
    one = Smoother(k)
    a = np.concatenate([one.update(scores[i:i + 1]) for i in range(len(scores))])
    blocks, out, i = Smoother(k), [], 0
    for size in [3, 192, 1, 9, 250, 2, 7, 192]:
        out.append(blocks.update(scores[i:i + size]))
        i += size
    out.append(blocks.update(scores[i:]))
    b = np.concatenate(out)
    assert a.tobytes() == b.tobytes()
    assert np.isnan(a[300:300 + k]).all() and np.isfinite(np.delete(a, range(300, 300 + k))).all()
    # the mean of its window (of what is there, at the start)
    np.testing.assert_allclose(a[k + 5], scores[6:k + 6].mean(), rtol=1e-12)
    np.testing.assert_allclose(a[1], scores[:2].mean(), rtol=1e-12)
