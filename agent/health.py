"""The health snapshot: what the agent publishes on `P health` and answers on its API.

Bounded in size whatever the number of streams: at most HEALTH_STREAMS streams are
listed in full (those in alarm first: an open alert, then one that ended unacknowledged;
then those in no_data, then learning, then by id),
the rest only counted in `streams_summary`, so a wildcard subscription with hundreds of
devices cannot turn one retained message into megabytes.
"""
from __future__ import annotations

import time

from .timestamps import iso_utc
from .config import AgentConfig
from .engine import Engine
from .staleness import stale_window
from .stream_status import LISTED

HEALTH_STREAMS = 32
_ORDER = {"anomaly": 0, "no_data": 1, "learning": 2, "warming_up": 3, "normal": 3}


def _shelved_until(st) -> str | None:
    """Until when a stream is shelved, while its sample time has not passed it (the
    tracker keeps it in elapsed time: agent/sample_clock.py)."""
    return iso_utc(st.tracker.shelved_until - st.clock.offset) if st.shelved else None


def stream_status(st) -> dict:
    return {"state": st.state, "alarm": st.tracker.alarm,
            "shelved_until": _shelved_until(st),
            "samples": st.samples, "calibrated": not st.baseline.learning,
            "threshold": st.threshold, "refined_from": st.baseline.refined_from,
            "last_sample": iso_utc(st.last_ts),
            "ring_resets": st.ring.resets, "windows_skipped": st.ring.skipped,
            "missing_channels": list(st.no_data[:LISTED]), "missing_count": len(st.no_data)}


def health_snapshot(cfg: AgentConfig, engine: Engine, runners) -> dict:
    h = engine.metrics.snapshot()
    streams = sorted(engine.streams.values(), key=lambda s: (
        _ORDER.get(s.state, 4) if s.tracker.rtn is None else 0.5, s.id))
    counts: dict[str, int] = {}
    for st in streams:
        counts[st.state] = counts.get(st.state, 0) + 1
        if st.tracker.rtn is not None:      # which streams need an ack, past the listed
            counts["rtn_unacknowledged"] = counts.get("rtn_unacknowledged", 0) + 1
    h.update({
        "ts": iso_utc(time.time()),
        "node": cfg.node,
        "model": {**engine.model_info, "window": engine.meta.window},
        "ep": engine.detector.ep,
        "sources": {r.stream.id: {"type": r.stream.source.type,
                                  "connected": bool(r.source.connected),
                                  "disconnects": r.source.disconnects} for r in runners},
        "streams": {st.id: stream_status(st) for st in streams[:HEALTH_STREAMS]},
        "streams_summary": {"total": len(streams), "listed": min(len(streams), HEALTH_STREAMS),
                            **counts},
    })
    if engine.store is not None:
        h["state_dir"] = engine.store.health()
    return h


def stream_presence(engine: Engine, runners, stale_after_s: float, now: float) -> dict[str, dict]:
    """Per stream what operators see at a glance: its state, whether it is online (its
    source is connected and its last sample arrived less than its stale window ago, by
    the monotonic clock `now`: `stale_after_s`, widened for a slow stream by
    agent/staleness.py), that window once its interval is known, and until when it is
    shelved (a shelve lifts when the stream's sample time passes it, so it is shown until
    then)."""
    connected = {r.stream.id: bool(r.source.connected) for r in runners}
    out = {}
    for st in list(engine.streams.values()):
        # online is judged on the steps seen so far while the interval is being learned (a
        # 3-min stream is not offline between its first 32 samples); the window shown (Home
        # Assistant's expire_after) waits for the learned one: it changes once, and the
        # discovery payload is not sent again at every step
        recent = now - st.last_seen < stale_window(stale_after_s, st.pace.estimate)
        out[st.id] = {"state": st.state,
                      "online": connected.get(st.source, False) and st.samples > 0 and recent,
                      "stale_after_s": stale_window(stale_after_s, st.pace.interval),
                      "shelved_until": _shelved_until(st)}
    return out
