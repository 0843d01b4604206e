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


SMALL_BLOCK = 8     # scores a step smooths in Python floats (Smoother._few)


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
        """Each output is the sum of its own window's scores, oldest first, over their count:
        the same additions in the same order however the scores were chunked, so a daemon
        fed one sample at a time and a file job's 192-row steps smooth to the same bits.
        (A difference of running sums, cheaper, is not: it rounds differently.)"""
        scores = np.asarray(scores, np.float64)
        if self.k == 1:
            return scores
        if len(scores) <= SMALL_BLOCK:
            return self._few(scores.tolist())
        k, n, h = self.k, len(scores), len(self._hist)
        pad = k - 1 - h
        # zeros before a short history: 0.0 + x is x, so every window can be k long
        b = np.concatenate((np.zeros(pad), self._hist, scores))
        total = b[:n].copy()
        for j in range(1, k):
            total += b[j:j + n]
        self._hist = b[pad:][-(k - 1):].copy()
        return total / np.minimum(np.arange(h + 1, h + n + 1), k)

    def _few(self, scores: list[float]) -> np.ndarray:
        """`update` of a few scores in Python floats (IEEE doubles either way): its numpy
        calls cost more than the sums when 500 streams each conclude a window or two."""
        hist, k, out = self._hist.tolist(), self.k, []
        for score in scores:
            hist.append(score)
            if len(hist) > k:
                del hist[0]
            acc = 0.0
            for v in hist:
                acc += v
            out.append(acc / len(hist))
        self._hist = np.array(hist[-(k - 1):])
        return np.array(out)


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


def places(due: list[tuple[Stream, Windows]]) -> list[int]:
    """Each due block's place among its own stream's due blocks (a stream may have several
    windows due: its pieces, agent/stream_pieces.py)."""
    nth: dict[int, int] = {}
    out = []
    for st, _ in due:
        nth[id(st)] = nth.get(id(st), -1) + 1
        out.append(nth[id(st)])
    return out


def normalized(due: list[tuple[Stream, Windows]], scores: np.ndarray,
                err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, errors as shown) of every due window: each stream's errors divided by its
    `shown_level()` and the score their mean, for all streams in one division (500 x 1
    window: not 500 divisions of a row).  Row by row one stream's arithmetic alone."""
    levels = [st.shown_level(i) for (st, _), i in zip(due, places(due))]
    plain = [lv is None for lv in levels]
    if all(plain):
        return scores, err
    c = err.shape[1]
    rows = [np.ones(c) if lv is None else lv for lv in levels]
    if len(err) == len(due) and all(r.ndim == 1 for r in rows):
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
