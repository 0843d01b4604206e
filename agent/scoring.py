"""What the scoring section adds to the model's score (defined in `contract.py`).

- `scoring.smoothing: k`: a moving average over the last k scores of one stream.
- `scoring.level_band: k`: each channel's error plus its squared excess beyond +-k stds
  of the stream's baseline (`level_excess`; off by default); `add_levels` applies it to
  a step's due windows.
- `scoring.normalize: channel`: each channel's error divided by the stream's typical
  error before the mean (`normalized`, for all of a step's streams at once).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .ring import Windows
    from .stream import Stream


class Smoother:
    """Moving average over the last k scores of one stream; blocks in, blocks out.

    Until k scores have been seen, the mean is over those available.
    """

    __slots__ = ("k", "_hist")

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"smoothing window must be >= 1, got {k}")
        self.k = k
        self._hist = np.empty(0, np.float64)

    def reset(self) -> None:
        self._hist = np.empty(0, np.float64)

    def update(self, scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores, np.float64)
        if self.k == 1:
            return scores
        h, k, n = len(self._hist), self.k, len(scores)
        if n == 1 and h == k - 1:
            return self._one(float(scores[0]))
        # The cumulative sum only spans k-1 old scores plus this block, so float
        # error cannot build up over a long-running stream.  c = [0, cumsum(hist, block)]
        c = np.empty(h + n + 1)
        c[0] = 0.0
        c[1:h + 1] = self._hist
        c[h + 1:] = scores
        self._hist = c[max(h + n + 1 - (k - 1), 1):].copy()
        np.add.accumulate(c, out=c)      # np.cumsum, without its wrapper
        if h == k - 1:          # a full history: every output averages k scores
            return (c[k:] - c[:len(c) - k]) / k
        end = np.arange(h + 1, h + len(scores) + 1)
        start = np.maximum(end - k, 0)
        return (c[end] - c[start]) / (end - start)

    def _one(self, score: float) -> np.ndarray:
        """`update` of one score after a full history, in Python floats: the same additions
        in the same order as the cumulative sum (IEEE doubles either way), without its
        eight numpy calls, which cost more than the sum itself when 500 streams each
        conclude one window per step."""
        hist = self._hist.tolist()
        acc = 0.0
        for v in hist:
            acc += v
        acc += score
        hist.append(score)
        self._hist = np.array(hist[1:])
        return np.array([acc / self.k])     # c[k] - c[0] with c[0] = 0.0: the same bits


def level_excess(x_last: np.ndarray, band: float) -> np.ndarray:
    """Per channel, (|x| - band)^2 where |x| > band, else 0 (float64 [B, C]), for the scaled
    newest samples x_last [B, C]: how far each channel lies outside +-band stds of its
    baseline.  A reconstruction model reproduces a sustained shifted level as easily as a
    normal one; this is the error it would have made had it kept the channel in range."""
    d = np.abs(x_last.astype(np.float64)) - band
    np.maximum(d, 0.0, out=d)
    return d * d


def add_levels(due: list[tuple[Stream, Windows]], scores: np.ndarray, err: np.ndarray) -> None:
    """Each stream's level term (scoring.level_band) added, in place, to its windows'
    errors and scores before they are normalised: what `Stream.scored` does for the
    learning period and `judge`, so every path scores alike."""
    off = 0
    for st, w in due:
        k = len(w)
        if st.level_band is not None:
            scores[off:off + k], err[off:off + k] = st.scored(w.x, scores[off:off + k],
                                                              err[off:off + k])
        off += k


def normalized(due: list[tuple[Stream, Windows]], scores: np.ndarray,
                err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, errors as shown) of every due window: each stream's errors divided by its
    `shown_level()` and the score their mean, for all streams in one division (500 x 1
    window: not 500 divisions of a row).  Row by row one stream's arithmetic alone."""
    nth: dict[int, int] = {}       # a stream may have several windows due (its pieces)
    levels = []
    for st, _ in due:
        i = nth[id(st)] = nth.get(id(st), -1) + 1
        levels.append(st.shown_level(i))
    plain = [lv is None for lv in levels]
    if all(plain):
        return scores, err
    c = err.shape[1]
    rows = [np.ones(c) if lv is None else lv for lv in levels]
    if len(err) == len(due):
        rows = np.stack(rows)
    elif all(r.ndim == 1 for r in rows):
        rows = np.repeat(np.stack(rows), [len(w) for _, w in due], axis=0)
    else:       # a level per window where a piece spans adapted levels ([k, C])
        rows = np.concatenate([np.broadcast_to(r, (len(w), c)) for r, (_, w) in zip(rows, due)])
    shown = err / rows
    normed = np.add.reduce(shown, axis=1) / c
    if any(plain):      # a stream without a level keeps the model's own score
        keep = np.repeat(plain, [len(w) for _, w in due])
        normed[keep] = scores[keep]
    return normed, shown
