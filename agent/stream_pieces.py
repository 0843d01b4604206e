"""The samples a stream has taken but not yet concluded, as pieces for its adapter.

Each ingest of an adapting stream leaves a piece: its raw samples, whether its windows await
their scores, the error level they are normalised by, and (once concluded) their errors.
The adapter learns from a piece only once its windows are judged (`_settle`, in order), so
what an alert's windows say decides which samples are learned.  A base class of
agent/stream.py's Stream (as stream_status.py is), so that stream.py keeps the step.
"""
from __future__ import annotations

import numpy as np

from .ring import Windows


class StreamPieces:
    """Needs the stream's `_pieces`, `adapter`, `baseline` and `normalize`."""
    __slots__ = ()

    def shown_level(self, i: int = 0) -> np.ndarray | None:
        """The error level the i-th windows `ingest` returned and `conclude` has not taken
        yet are normalised by ([C], or [windows, C] when they span adapted levels; None:
        they are not): the engine divides every stream's errors by theirs at once."""
        if not self.normalize:
            return None
        if self.adapter is None:
            return self.baseline.level
        return [p for p in self._pieces if p[1] is True][i][2]

    def _scaled(self, values: np.ndarray, parts: list) -> np.ndarray:
        out = np.empty(values.shape, np.float32)
        for a, b, v in parts:
            out[a:b] = self.adapter.at(v)[0].apply(values[a:b])
        return out

    def _piece(self, values: np.ndarray, w: Windows | None, parts: list) -> list:
        """A pending piece: [raw, True (awaiting scores) | False (no window), the error
        level of its windows ([C], [windows, C] when its parts' levels differ, or None),
        errors (once concluded)]."""
        if w is None:
            return [values, False, None, None]
        ends = np.searchsorted(w.rows, [b for _, b, _ in parts]).tolist()
        counts = [b - a for a, b in zip([0] + ends, ends)]
        levels = [self.adapter.at(v)[1] for (_, _, v), n in zip(parts, counts) if n]
        lv = levels[0]
        if any(x is not lv for x in levels):
            lv = np.repeat(np.stack(levels), [n for n in counts if n], axis=0)
        return [values, True, lv, None]

    def abandon(self, windows: int) -> None:
        """The newest windows could not be concluded (a bug): their samples are learned
        from by no channel, so the adapter's epochs stay whole."""
        if self.baseline.refiner is not None:
            self.baseline.refiner.dropped(windows)
        if self._pieces:
            self._pieces[0][1] = False
            self._settle()

    def _settle(self) -> None:
        """Hand concluded pieces to the adapter, in order (a piece without windows has
        no normal sample; one still awaiting its scores stops the queue)."""
        q = self._pieces
        while q and q[0][1] is not True:
            raw, ok, _, err = q.pop(0)
            self.adapter.observe(raw, ok if ok is not False else None, err)

    def unjudged(self, i: int, w: Windows, keep: np.ndarray) -> Windows:
        """The model gave no finite score to the windows of the i-th due block `w` that
        `keep` leaves out (agent/model_call.py): the block without them, perhaps none,
        counting them (`dropped`); `conclude` takes it in its turn, so that the refinement
        counts them in order, and their samples are learned from by no channel."""
        piece = [p for p in self._pieces if p[1] is True][i] if self.adapter is not None \
            else None
        if piece is not None and isinstance(piece[2], np.ndarray) and piece[2].ndim == 2:
            piece[2] = piece[2][keep]       # a level per window: the kept windows'
        off = w.off[keep] if isinstance(w.off, np.ndarray) else w.off
        return Windows(w.ts[keep], w.x[keep], w.rows[keep], off, int(len(keep) - keep.sum()))
