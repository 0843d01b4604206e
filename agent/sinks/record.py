"""Keeps per-window results in memory: replay CSV output, evaluation, benchmarks.

Blocks are appended as numpy arrays (no per-window Python objects) and joined once.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from .base import Sink


class RecordSink(Sink):
    def __init__(self, keep_scores: bool = True):
        self.keep_scores = keep_scores
        self._blocks: dict[str, list[tuple]] = defaultdict(list)
        self.alerts: list[dict] = []
        self.thresholds: dict[str, float] = {}

    def scores(self, stream, ts, scores, threshold, labels, alert_open) -> None:
        if self.keep_scores:
            self._blocks[stream].append((np.array(ts), np.array(scores), np.array(labels),
                                         np.array(alert_open)))
        self.thresholds[stream] = threshold

    def alert(self, alert: dict) -> None:
        self.alerts.append(alert)

    def table(self, stream: str) -> dict[str, np.ndarray]:
        """{"ts", "score", "label", "alert"} arrays for one stream, in order."""
        blocks = self._blocks.get(stream, [])
        if not blocks:
            return {k: np.empty(0) for k in ("ts", "score", "label", "alert")}
        cols = list(zip(*blocks))
        return {k: np.concatenate(v) for k, v in zip(("ts", "score", "label", "alert"), cols)}
