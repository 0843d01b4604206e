"""The standing check (agent/standing.py) against the rule written out with np.median.

The incremental halves must settle exactly when the plain rule does, step by step, for
any split of the samples into steps, with clock jitter, ties and NaN scores mixed in.
"""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from agent.standing import STANDING_CHANGE, StandingCheck


class PlainRule:
    """The rule as stated: keep the samples no older than span before the last one (once
    dropped, gone), split them at half a span before it, compare the two medians."""

    def __init__(self, span):
        self.span, self.t, self.s = span, np.empty(0), np.empty(0)

    def add(self, ts, scores):
        t, s = np.concatenate([self.t, ts]), np.concatenate([self.s, scores])
        if len(t):
            keep = t >= t[-1] - self.span
            t, s = t[keep], s[keep]
        self.t, self.s = t, s
        self.last = t[-1] if len(t) else None

    def settled(self, start, threshold):
        if not len(self.t) or not self.t[-1] - start >= self.span:
            return False
        half = self.t[-1] - self.span / 2
        a, b = self.s[self.t < half], self.s[self.t >= half]
        if not (len(a) and len(b)):
            return False
        with np.errstate(invalid="ignore"):
            m1, m2 = float(np.median(a)), float(np.median(b))
        return min(m1, m2) >= threshold and abs(m2 - m1) <= STANDING_CHANGE * m1


@st.composite
def alert_scores(draw):
    n = draw(st.integers(1, 400))
    # mostly increasing sample times, some repeated or stepping back (clock jitter)
    dt = draw(st.lists(st.sampled_from([1.0, 1.0, 1.0, 0.5, 0.0, -0.7, 3.0]),
                       min_size=n, max_size=n))
    t = 1000.0 + np.cumsum(dt)
    # a few distinct levels, so ties are common; some NaN
    lv = draw(st.lists(st.sampled_from([1.0, 1.1, 1.3, 2.0, 4.0, np.nan]), min_size=n,
                       max_size=n))
    cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=20)))) if n > 1 else []
    return t, np.array(lv), cuts


@settings(max_examples=300, deadline=None)
@given(alert_scores(), st.sampled_from([4.0, 10.0, 37.0]))
def test_the_check_settles_exactly_when_the_plain_rule_does(case, span):
    t, s, cuts = case
    mine, plain = StandingCheck(span), PlainRule(span)
    for a, b in zip([0, *cuts], [*cuts, len(t)]):
        mine.add(t[a:b], s[a:b])
        plain.add(t[a:b], s[a:b])
        assert mine.last_ts == t[b - 1]
        for thr in (0.5, 1.2, 3.0):
            assert mine.settled(t[0], thr) == plain.settled(t[0], thr), (a, b, thr)


def test_a_span_of_steady_scores_settles_and_a_growing_fault_does_not():
    c = StandingCheck(600.0)
    t = np.arange(0, 1200, 0.01)
    c.add(t[:30000], np.full(30000, 5.0))
    assert not c.settled(0.0, 1.0), "open for less than a span"
    for i in range(30000, len(t), 1000):
        c.add(t[i:i + 1000], np.full(1000, 5.0))
    assert c.settled(0.0, 1.0) and not c.settled(0.0, 6.0)
    # the samples kept are one span's worth, not the alert's whole history
    assert c._hi - c._lo == 60001 and len(c._t) <= 4 * 60001
    growing = StandingCheck(600.0)
    growing.add(t, 2.0 + t / 100)
    assert not growing.settled(0.0, 1.0)


def test_an_empty_step_changes_nothing():
    c = StandingCheck(10.0)
    c.add(np.arange(30.0), np.full(30, 2.0))
    assert c.settled(0.0, 1.0)
    c.add(np.empty(0), np.empty(0))
    assert c.settled(0.0, 1.0) and c.last_ts == 29.0
