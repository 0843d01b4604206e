"""Where recall goes on labeled files: each labeled event's scores against the threshold.

    python benchmarks/event_scores.py FILE_OR_FOLDER ... [--models DLinear_ad,...]

Each file is replayed as one deployed stream through the engine with each model's own
policy, as `tsad-agent evaluate` replays it.  Per labeled event (a run of `anomaly` = 1
rows) it prints, with scores divided by the stream's threshold at the time:
  * `pre max`: the highest score between the end of learning and the event's start (how
    close normal running came),
  * `event p50` and `event max`: the event's median and highest score,
  * `open`: the share of the event's rows with an alert open (its recall),
  * `delay`: seconds from the labeled start to the first alert inside the event,
  * `moved`: seconds from the labeled start to the first row where a raw channel lies
    over MOVED stds from its mean over the PRE rows before the event (no model): what
    any detector needs at least, where the labels start before the sensors show it,
  * `after`: the share of the rows after the event with an alert open.
An event whose `event max` stays near `pre max` is invisible to the model, whatever the
threshold; one with a high max but a long delay is found late.  For diagnosis on files
that choose nothing: never pick a setting from this on files reported as held out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.contract import read_table  # noqa: E402
from agent.detector import Detector  # noqa: E402
from agent.engine import Engine  # noqa: E402
from agent.evaluate import evaluation_files  # noqa: E402
from agent.jobs import detection_config, rows_prediction, run_table  # noqa: E402
from agent.model_meta import PADDLEX_MODELS  # noqa: E402
from agent.shipped import resolve_model  # noqa: E402

MOVED = 5.0     # stds of the rows before an event: a move that is not noise
PRE = 150       # rows before an event that set its channels' normal spread


def runs(labels: np.ndarray) -> list[tuple[int, int]]:
    """(first, end) rows of each run of 1s."""
    d = np.diff(np.concatenate([[0], (labels > 0).astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def moved_s(t, a: int, b: int) -> float | None:
    """Seconds from row a to the first row of a..b with a channel over MOVED stds from
    the mean of the PRE rows before a (None: none moves that far)."""
    pre = t.values[max(a - PRE, 0):a].astype(np.float64)
    if len(pre) < 2:
        return None
    mean, std = np.nanmean(pre, axis=0), np.nanstd(pre, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        far = np.abs(t.values[a:b] - mean) > MOVED * np.where(std > 0, std, np.nan)
    hit = np.flatnonzero(far.any(axis=1))
    return float(t.ts[a + hit[0]] - t.ts[a]) if len(hit) else None


def event_rows(path: Path, det: Detector) -> list[dict]:
    """One dict per labeled event of one file (see the module docstring)."""
    t = read_table(path, det.meta.channels)
    if t.labels is None:
        return []
    tb = run_table(Engine(detection_config(det.meta), det), "s", t.ts, t.values).table("s")
    # per row: score / threshold of the window ending there (NaN where none), alert open
    rel = np.full(len(t.ts), np.nan)
    idx = np.searchsorted(t.ts, tb["ts"])
    ok = idx < len(t.ts)
    rel[idx[ok]] = tb["score"][ok] / tb["threshold"][ok]
    alert = rows_prediction(t.ts, tb, "alert")
    out = []
    # each event with the end of the one before it and the start of the one after it
    events = runs(t.labels)
    ends = [0] + [e for _, e in events]
    starts = [s for s, _ in events[1:]] + [len(alert)]
    for (a, b), prev_end, nxt in zip(events, ends, starts):
        pre, ev = rel[prev_end:a], rel[a:b]
        hit = np.flatnonzero(alert[a:b])
        after = alert[b:nxt]
        out.append({"file": path.name, "rows": b - a,
                    "pre_max": float(np.nanmax(pre)) if np.isfinite(pre).any() else np.nan,
                    "p50": float(np.nanmedian(ev)) if np.isfinite(ev).any() else np.nan,
                    "max": float(np.nanmax(ev)) if np.isfinite(ev).any() else np.nan,
                    "open": float(alert[a:b].mean()),
                    "delay": float(t.ts[a + hit[0]] - t.ts[a]) if len(hit) else None,
                    "moved": moved_s(t, a, b),
                    "after": float(after.mean()) if len(after) else np.nan})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--models", default=",".join(PADDLEX_MODELS))
    a = ap.parse_args()
    try:
        files = evaluation_files(a.paths)
    except (OSError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2
    for model in a.models.split(","):
        det = Detector(resolve_model(model))
        rows = [r for f in files for r in event_rows(f, det)]
        print(f"{model}: score / threshold per labeled event")
        print(f"  {'file':<12} {'rows':>5} {'pre max':>7} {'event p50':>9} {'event max':>9} "
              f"{'open':>5} {'delay s':>7} {'moved s':>7} {'after':>5}")
        for r in rows:
            delay, moved = ("-" if r[k] is None else f"{r[k]:.0f}" for k in ("delay", "moved"))
            print(f"  {r['file']:<12} {r['rows']:>5} {r['pre_max']:>7.2f} {r['p50']:>9.2f} "
                  f"{r['max']:>9.2f} {r['open']:>5.2f} {delay:>7} {moved:>7} {r['after']:>5.2f}")
        missed = [r for r in rows if r["delay"] is None]
        print(f"  {len(rows)} events, {len(missed)} without an alert; of those, event max "
              f"under 1.5 x pre max: {sum(r['max'] < 1.5 * r['pre_max'] for r in missed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
