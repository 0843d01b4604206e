"""When a stream counts as stale (offline): no sample for max(`mqtt.stale_after_s`,
STALE_INTERVALS x its sampling interval).

A fixed window shorter than a stream's interval would flap it offline between every two
samples (a historian sampling every 3 min against the 60 s default), and Home
Assistant's score entity would expire between them.  The interval is the stream's
`interval_s`, else the one it learned from its first samples (agent/pace.py); while it
learns one, availability follows the median step so far (`Pace.estimate`).  The window of
the known interval (`stale_after_s` before it is learned), plus `score_interval_s`, is the
score entity's `expire_after` (agent/sinks/homeassistant.py).
"""
from __future__ import annotations

# one late or lost sample (a gap of two intervals, with jitter) is not an outage; a
# stream that missed two in a row is shown as one
STALE_INTERVALS = 3


def stale_window(stale_after_s: float, interval: float | None) -> float:
    """Seconds without a sample after which a stream sampled every `interval` s is stale."""
    return stale_after_s if interval is None else max(stale_after_s, STALE_INTERVALS * interval)


def widening_note(stale_after_s: float, interval: float) -> str | None:
    """check-config's word on a configured interval that widens the window, else None."""
    if STALE_INTERVALS * interval <= stale_after_s:
        return None
    return (f"interval_s {interval:g} s: {STALE_INTERVALS} intervals are more than "
            f"mqtt.stale_after_s {stale_after_s:g} s, so "
            f"the stream counts as offline after {stale_window(stale_after_s, interval):g} s "
            f"without a sample ({STALE_INTERVALS} intervals), not {stale_after_s:g} s, and "
            f"Home Assistant's score expires with it")
