"""Fitting a model's default policy on normal data (`tsad-agent fit-policy`).

The settings that shape detection (learning period, adaptation, per-channel
normalisation, smoothing, alert hysteresis) are given; this finds the one number
that depends on the model and the plant: the threshold margin.  Rule, on normal
data only:

- Each normal recording is replayed as a deployed stream lives: it learns on its
  first `learning` rows, then runs to its end, through the engine exactly as
  deployed (alerts, freezing, adaptation, all of it), for a candidate margin.
- The margin is the smallest on a geometric grid (1.1x steps) for which these normal
  recordings raise at most `alerts_per_day` alerts per day of running (at least 1 in
  all) and keep an alert open on at most `open_share` of their running rows.
- Optionally, fresh starts (`starts`): the first `start_h` hours after each start
  recording's learning period.  A plant settling after a start is normal, but pooled
  with days of steady running its alerts are diluted to nothing, so starts get their
  own rule: the start margin is the smallest grid margin for which at most
  1 - `start_quantile` of the starts raise an alert in those hours (the quantile of
  each start's quiet margin), times `safety`, rounded up onto the grid.  The policy
  takes the larger of the two margins, so both rules hold.
- Optionally, the refinement's margin (`calibration.refine`, agent/refine.py), once the
  threshold margin is fixed, over learning starts: each recording replayed from its
  first row and from every `after_s` of sample time after it, while its refined
  threshold then runs for as long as its span (`after_s + 2 x span_s` of running after
  learning).  The smallest grid margin from 1 up at which no start raises more alerts
  than it does without refinement (an alert open on at most `open_share` of their rows,
  or as many as without it), times `safety`, rounded up onto the grid.  A threshold
  refined on the stream's own running should cost an operator nothing on normal data,
  wherever its learning happened to start: fitted on one start only, the margins let
  later normal running cross thresholds refined on a quiet half hour (docs/RESULTS.md,
  seventeenth session).

A `running` section (`--set running.channel=... --set running.above=...`: the plant's own
run condition, README: Machines that stop) is honoured by the fit and recorded under
`fitted.running`, not in the settings: no model's policy holds a plant's channel.

So the threshold is set by how often the plant's own normal operation would disturb
an operator, never by labeled faults.  The result goes into the model's metadata
(`policy`), which every entry point then uses by default (agent/policy.py).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .contract import learning_rows_problem, read_table
from .detector import Detector
from .engine import Engine
from .config import DetectionConfig, RefineConfig
from .config_base import ConfigError
from .config_build import build
from .jobs import detection_config, long_run, rows_prediction, run_table
from .policy_store import files_record

log = logging.getLogger("tsad.policy_fit")

GRID = tuple(round(1.1 ** k, 3) for k in range(-15, 40))  # margins 0.24 .. ~41


@dataclass
class Segment:
    path: Path
    ts: np.ndarray
    values: np.ndarray


def parse_settings(items: list[str]) -> dict:
    """fit-policy's `--set SECTION.KEY=VALUE` items (a JSON value, else the text) as the
    settings of a policy, checked as the detection section of a config would be.
    Raises ValueError (a ConfigError naming the flag) on a bad item or value."""
    settings: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        sec, dot, name = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. "
                             "scoring.smoothing=10")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        settings.setdefault(sec, {})[name] = value
    try:
        build(DetectionConfig, settings)
    except ConfigError as e:
        raise ConfigError([f"--set {p}" for p in e.problems]) from None
    return settings


def segments(files: list[Path], channels: list[str], learning: int) -> list[Segment]:
    """The recordings long enough to run after their learning period (more than twice
    its rows: a run at least as long as what it learned on); the others are logged.
    ValueError for a recording with rows labelled anomalous: margins come from normal
    running only, as a model is trained on it."""
    out = []
    for f in files:
        t = read_table(f, channels)
        flagged = np.flatnonzero(t.labels) if t.labels is not None else ()
        if len(flagged):
            raise ValueError(f"{f}: {len(flagged)} row(s) labelled anomalous (first at row "
                             f"{flagged[0] + 1}); fit a policy on normal recordings only")
        if len(t.ts) > 2 * max(learning, 1):
            out.append(Segment(f, t.ts, t.values))
        else:
            log.warning("%s: %d rows, not more than twice the learning period (%d rows): "
                        "not used", f, len(t.ts), learning)
    return out


def with_margin(det: Detector, settings: dict, margin: float, learning: int) -> dict:
    """The settings at `margin`: on the threshold the learning period fits, or without one
    (learning 0) on the model's own threshold."""
    if learning:
        return {**settings, "calibration": {**settings.get("calibration", {}),
                                            "enabled": True, "samples": learning,
                                            "margin": margin}}
    return {**settings, "calibration": {**settings.get("calibration", {}), "enabled": False},
            "scoring": {**settings.get("scoring", {}),
                        "threshold": round(det.meta.threshold.value * margin, 6)}}


def predictions(det: Detector, segs: list[Segment], settings: dict, margin: float,
                learning: int):
    """(segment, alert open per running row) for each segment replayed at `margin`."""
    # the settings alone, not over the model's current policy: they are all the new one holds
    cfg = detection_config(det.meta, None, {**with_margin(det, settings, margin, learning),
                                            "model_policy": False})
    for seg in segs:
        rec = run_table(Engine(cfg, det), "s", seg.ts, seg.values)
        yield seg, rows_prediction(seg.ts, rec.table("s"), "alert")[learning:]


def trial(det: Detector, segs: list[Segment], settings: dict, margin: float,
          learning: int) -> dict:
    """Alerts, hours and open share over the segments' running rows at `margin`."""
    alerts, hours, open_rows, rows = 0, 0.0, 0, 0
    for seg, pred in predictions(det, segs, settings, margin, learning):
        lr = long_run(seg.ts[learning:], pred)
        alerts, hours = alerts + lr["alerts"], hours + lr["hours"]
        open_rows, rows = open_rows + int(pred.sum()), rows + len(pred)
    return {"margin": margin, "alerts": alerts, "hours": round(hours, 2),
            "open_share": open_rows / rows if rows else 0.0}


def first_hours(segs: list[Segment], learning: int, hours: float) -> list[Segment]:
    """Each segment cut to its learning period and the `hours` after it."""
    out = []
    for seg in segs:
        end = int(np.searchsorted(seg.ts, seg.ts[learning] + hours * 3600.0, side="left"))
        out.append(Segment(seg.path, seg.ts[:end], seg.values[:end]))
    return out


def start_alerts(det: Detector, starts: list[Segment], settings: dict, margin: float,
                 learning: int) -> tuple[list[int], float]:
    """(alerts from each start, the share of their running rows with an alert open)."""
    alerts, open_rows, rows = [], 0, 0
    for seg, pred in predictions(det, starts, settings, margin, learning):
        alerts.append(long_run(seg.ts[learning:], pred)["alerts"])
        open_rows, rows = open_rows + int(pred.sum()), rows + len(pred)
    return alerts, open_rows / rows if rows else 0.0


def start_trial(det: Detector, starts: list[Segment], settings: dict, margin: float,
                learning: int) -> dict:
    """How many starts raise an alert at `margin`, and the share of their rows flagged."""
    alerts, share = start_alerts(det, starts, settings, margin, learning)
    return {"margin": margin, "starts": len(starts), "alerting": sum(a > 0 for a in alerts),
            "open_share": share}


def rounded_up(i: int, safety: float) -> int:
    """The grid index of GRID[i] x safety, rounded up onto the grid; the grid's margins
    are rounded to 3 decimals, so 1.1 x one of them may lie a hair (up to 0.3 %) above
    the next; steps of 10 % leave room for a 0.5 % tolerance."""
    want = GRID[i] * safety * (1.0 - 5e-3)
    return next((k for k, m in enumerate(GRID) if m >= want), len(GRID) - 1)


def bisect(run, ok, lo: int = 0) -> tuple[int, list[dict]]:
    """The smallest grid index from `lo` whose trial `ok` accepts (alerts fall as the
    margin grows), and the trials run, smallest margin first; the chosen one is the one
    at that index."""
    tried: dict[int, dict] = {}
    hi = len(GRID) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        tried[mid] = run(GRID[mid])
        if ok(tried[mid]):
            hi = mid
        else:
            lo = mid + 1
    if lo not in tried:
        tried[lo] = run(GRID[lo])
    return lo, [tried[i] for i in sorted(tried)]


def fit_margin(det: Detector, files: list[Path], settings: dict, learning: int,
               alerts_per_day: float = 1.0, open_share: float = 0.01) -> tuple[dict, list[dict]]:
    """(the chosen trial, every trial run), smallest margin first."""
    return _fit_segments(det, segments(files, det.meta.channels, learning), settings, learning,
                         alerts_per_day, open_share)


def _fit_segments(det: Detector, segs: list[Segment], settings: dict, learning: int,
                  alerts_per_day: float, open_share: float) -> tuple[dict, list[dict]]:
    if not segs:
        raise ValueError(f"no normal recording has more than twice the learning period's "
                         f"rows ({2 * max(learning, 1)})")
    ok = lambda r: (r["alerts"] <= max(1.0, alerts_per_day * r["hours"] / 24)  # noqa: E731
                    and r["open_share"] <= open_share)
    i, tried = bisect(lambda m: trial(det, segs, settings, m, learning), ok)
    best = next(r for r in tried if r["margin"] == GRID[i])
    # a stop or a start-up the model never learned is judged all through (training audit)
    hint = "" if "running" in settings else ("; recordings that hold stops need the plant's "
                                             "run condition: --set running.channel=CH --set "
                                             "running.above=LEVEL")
    if not ok(best):        # the grid's top: no margin on it meets the rule
        raise ValueError(f"no margin up to {GRID[-1]:g} meets the rule: at {best['margin']:g}, "
                         f"{best['alerts']} alert(s) in {best['hours']:g} h with an alert open "
                         f"on {100 * best['open_share']:.2f}% of the rows{hint}")
    if i == len(GRID) - 1:
        log.warning("the margin is the grid's largest (%g): these recordings' normal running "
                    "is judged as far from normal as it can be; check them (a unit change, "
                    "the wrong model)%s", GRID[-1], hint)
    return best, tried


def with_refine(settings: dict, refine: dict, margin: float) -> dict:
    cal = settings.get("calibration", {})
    return {**settings, "calibration": {**cal, "refine": {**refine, "margin": margin}}}


def learning_starts(segs: list[Segment], learning: int, every_s: float,
                    run_s: float) -> list[Segment]:
    """Each segment from its first row and from every `every_s` of sample time after that,
    while `run_s` of running follows the learning period."""
    out = []
    for seg in segs:
        t, s = seg.ts, 0
        while s + learning < len(t) and t[-1] - t[s + learning] >= run_s:
            out.append(Segment(seg.path, t[s:], seg.values[s:]))
            nxt = np.flatnonzero(t[s + 1:] >= t[s] + every_s)     # a clock may step back
            if not len(nxt):
                break
            s += 1 + int(nxt[0])
    return out


def fit_refine_margin(det: Detector, segs: list[Segment], settings: dict, refine: dict,
                      margin: float, learning: int, open_share: float,
                      safety: float) -> tuple[dict, list[dict]]:
    """The refinement's rule (module rules) at threshold margin `margin`: (the chosen
    trial, every trial run)."""
    rc = RefineConfig(**refine)
    # a start counts where its refined threshold then runs for as long as its span (what
    # it was set on); starts come every after_s (span_s when that is 0)
    run_s = rc.after_s + 2 * rc.span_s
    starts = learning_starts(segs, learning, rc.after_s or rc.span_s, run_s)
    if not starts:
        raise ValueError(f"no normal recording runs {run_s / 3600:.3g} h past its learning "
                         f"period (after_s + 2 x span_s): too short to fit the refinement's "
                         f"margin")
    base, base_share = start_alerts(det, starts, settings, margin, learning)

    def run(m: float) -> dict:
        alerts, share = start_alerts(det, starts, with_refine(settings, refine, m), margin,
                                     learning)
        return {"margin": m, "starts": len(starts), "alerts": sum(alerts),
                "worse": sum(a > b for a, b in zip(alerts, base)), "open_share": share}

    ok = lambda r: (r["worse"] == 0  # noqa: E731
                    and r["open_share"] <= max(open_share, base_share))
    i, tried = bisect(run, ok, GRID.index(1.0))
    if not ok(next(r for r in tried if r["margin"] == GRID[i])):
        raise ValueError(f"no refinement margin up to {GRID[-1]:g} meets its rule")
    j = rounded_up(i, safety)
    best = next((r for r in tried if r["margin"] == GRID[j]), None) or run(GRID[j])
    return best, sorted(tried + ([best] if best not in tried else []), key=lambda r: r["margin"])


def fit_start_margin(det: Detector, files: list[Path], settings: dict, learning: int,
                     start_h: float, start_quantile: float,
                     safety: float) -> tuple[dict, list[dict]]:
    """The start rule (module rules): (the trial at the start margin, every trial run)."""
    starts = first_hours(segments(files, det.meta.channels, learning), learning, start_h)
    if not starts:
        raise ValueError(f"no start recording runs longer than its learning period "
                         f"({learning} rows)")
    allowed = int(np.floor((1.0 - start_quantile) * len(starts) + 1e-9))
    run = lambda m: start_trial(det, starts, settings, m, learning)  # noqa: E731
    i, tried = bisect(run, lambda r: r["alerting"] <= allowed)
    top = tried[-1]
    if top["margin"] == GRID[i] and top["alerting"] > allowed:
        raise ValueError(f"no margin up to {GRID[-1]:g} meets the start rule: at "
                         f"{top['margin']:g}, {top['alerting']} of {top['starts']} starts alert")
    j = rounded_up(i, safety)
    best = next((r for r in tried if r["margin"] == GRID[j]), None) or run(GRID[j])
    return best, sorted(tried + ([best] if best not in tried else []),
                        key=lambda r: r["margin"])


def _check_rule(learning: int, alerts_per_day: float, open_share: float, start_h: float,
                start_quantile: float, safety: float) -> None:
    """The rule's numbers, each named by its fit-policy flag (NaN fails every test)."""
    if problem := learning_rows_problem("--learn", learning):
        raise ValueError(problem)
    for flag, v, ok, want in (
            ("--alerts-per-day", alerts_per_day, 0 <= alerts_per_day < math.inf, "a number >= 0"),
            ("--open-share", open_share, 0 <= open_share <= 1, "a share of rows from 0 to 1"),
            ("--start-hours", start_h, 0 < start_h < math.inf, "a number of hours > 0"),
            ("--start-quantile", start_quantile, 0 < start_quantile <= 1,
             "a share of the starts, over 0 and at most 1"),
            ("--safety", safety, 1 <= safety < math.inf, "a factor >= 1")):
        if not ok:
            raise ValueError(f"{flag} {v:g}: expected {want}")


def fit_policy(model: str, files: list[Path], settings: dict, learning: int, reason: str,
               alerts_per_day: float = 1.0, open_share: float = 0.01,
               data_root: Path | None = None, starts: list[Path] | None = None,
               start_h: float = 8.0, start_quantile: float = 0.95,
               safety: float = 1.1) -> dict:
    """The policy (metadata `policy`) for `model` on normal `files` (and `starts`)."""
    _check_rule(learning, alerts_per_day, open_share, start_h, start_quantile, safety)
    refine = settings.get("calibration", {}).get("refine")
    if refine is not None and "margin" in refine:
        raise ValueError("--set calibration.refine: its margin is what fit-policy fits, not a "
                         "setting to give")
    if refine is not None:      # fitted after the threshold margin, which is fitted without it
        settings = {**settings, "calibration": {k: v for k, v in settings["calibration"].items()
                                                if k != "refine"}}
    fitted_keys = {("calibration", "margin"): "what fit-policy fits",
                   ("calibration", "samples"): "set by --learn",
                   ("calibration", "enabled"): "set by --learn (0: none)",
                   # the engine would end learning where duration_s does, the fit counts
                   # alerts from row --learn: each would judge rows the other did not
                   ("calibration", "duration_s"): "the fit learns on each recording's first "
                   "--learn rows and counts alerts from there (give the rows of that duration "
                   "at the recordings' interval, 1800 s at 5 s: --learn 360, and set "
                   "calibration.duration_s in the deployment's config)",
                   ("scoring", "threshold"): "the model's threshold times the fitted margin"}
    for (sec, key), why in fitted_keys.items():
        if key in settings.get(sec, {}):
            raise ValueError(f"--set {sec}.{key}: {why}, not a setting to give")
    det = Detector(model)
    segs = segments(files, det.meta.channels, learning)     # each file read once
    best, tried = _fit_segments(det, segs, settings, learning, alerts_per_day, open_share)
    rule = ("smallest margin on a 1.1x grid (on the threshold "
            + (f"learned on each recording's first {learning} rows" if learning
               else "of the model") + ") for which the normal recordings, each "
            f"running from its start to its end as a deployed stream, raise at "
            f"most {alerts_per_day:g} alert(s) per day of running (at least 1 in all) "
            f"with an alert open on at most {100 * open_share:g}% of running rows")
    fitted: dict = {}
    if starts:
        sbest, stried = fit_start_margin(det, starts, settings, learning, start_h,
                                         start_quantile, safety)
        rule += (f"; and at least the start margin: {safety:g} x the smallest margin for "
                 f"which at most {100 * (1 - start_quantile):g}% of the starts raise an "
                 f"alert in their first {start_h:g} h of running, rounded up onto the grid")
        fitted["starts"] = {"data": files_record(starts, data_root), "result": sbest,
                            "trials": stried}
        if sbest["margin"] > best["margin"]:
            best = trial(det, segs, settings, sbest["margin"], learning)
            tried = sorted(tried + [best], key=lambda r: r["margin"])
    if refine is not None:
        rbest, rtried = fit_refine_margin(det, segs, settings, refine, best["margin"], learning,
                                          open_share, safety)
        rule += ("; then the refinement's margin (calibration.refine): over learning starts "
                 "at each recording's first row and every after_s after it (after_s + 2 x "
                 f"span_s of running after learning), {safety:g} x the smallest margin from 1 up at "
                 "which no start raises more alerts than without refinement (an alert open "
                 f"on at most {100 * open_share:g}% of running rows, or as many as without "
                 "it), rounded up onto the grid")
        fitted["refine"] = {"result": rbest, "trials": rtried}
        settings = with_refine(settings, refine, rbest["margin"])
    chosen = with_margin(det, settings, best["margin"], learning)
    # `running` names the plant's own channel: the fit honours it, no model's policy holds it
    if (running := chosen.pop("running", None)) is not None:
        fitted["running"] = running
    return {"settings": chosen, "reason": reason, "fitted": {
        "rule": rule, "data": files_record([seg.path for seg in segs], data_root), "result": best, "trials": tried,
        **fitted,
        "fitted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}}
