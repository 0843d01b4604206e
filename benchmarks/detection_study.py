"""The detection policy's trade-off, measured through the engine (what is deployed):
for each setting of one knob, SKAB valve1/ and valve2/ F1/FAR (SKAB protocol: each
file learns on its first 400 rows) beside the long normal run (anomaly-free.csv as
one stream): the share of its rows with an alert open and the alerts raised.

    python benchmarks/detection_study.py --knob adaptation.time_constant_s \\
        --values none,600,1800,3600,7200 [--models DLinear_ad,...] [--base '{"adaptation": {"enabled": true}}']

`none` runs without adaptation.  valve2/ is reported but never used to choose a
setting (it stands in for faults the models never saw); the long run decides first.

With --refit each value gets its own threshold margin, fitted on the normal run as
`tsad-agent fit-policy` fits the shipped ones (agent/policy_fit.py: at most 1 alert per
day, at most 1 % of rows open): the curve then compares policies as they would ship.
The long run is then in-sample (the margin was fitted on it); valve1/valve2 are not.
`--base policy` starts from each model's shipped policy settings.

    python benchmarks/detection_study.py --base policy --refit \
        --values none,300,600,1800,3600,7200
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.contract import read_table  # noqa: E402
from agent.detector import Detector  # noqa: E402
from agent.engine import Engine  # noqa: E402
from agent.evaluate import Counts, skab_files  # noqa: E402
from agent.jobs import detection_config, rows_prediction, run_table  # noqa: E402
from agent.model_meta import PADDLEX_MODELS  # noqa: E402
from agent.policy_fit import fit_margin, with_margin  # noqa: E402
from agent.shipped import resolve_model  # noqa: E402

SKAB = REPO.parent / "shared" / "data" / "skab"
LEARN = 400


def run(det: Detector, path: Path, over: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    t = read_table(path, det.meta.channels)
    rec = run_table(Engine(detection_config(det.meta, LEARN, over), det), "s", t.ts, t.values)
    return t.ts, rows_prediction(t.ts, rec.table("s"), "alert"), t.labels


def labeled(det: Detector, files: list[Path], over: dict) -> dict:
    c = Counts()
    for f in files:
        _, pred, lab = run(det, f, over)
        c.add(lab[LEARN:], pred[LEARN:])
    return c.summary()


def long_run(det: Detector, over: dict) -> tuple[float, int]:
    _, pred, _ = run(det, SKAB / "anomaly-free" / "anomaly-free.csv", over)
    p = pred[LEARN:]
    return float(p.mean()), int(np.sum(np.diff(np.concatenate([[0], p])) == 1))


def setting(base: dict, knob: str, value) -> dict:
    over = json.loads(json.dumps(base))
    if value == "none":
        over.setdefault("adaptation", {})["enabled"] = False
        return over
    sec, key = knob.split(".")
    over.setdefault(sec, {})[key] = value
    return over


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--knob", default="adaptation.time_constant_s")
    ap.add_argument("--values", default="none,600,1800,3600,7200")
    ap.add_argument("--models", default=",".join(PADDLEX_MODELS))
    ap.add_argument("--base", default='{"adaptation": {"enabled": true}}',
                    help="settings every value starts from (JSON), or 'policy': each "
                         "model's shipped policy")
    ap.add_argument("--refit", action="store_true",
                    help="fit the threshold margin on the normal run for each value")
    a = ap.parse_args()
    values = [v if v == "none" else json.loads(v) for v in a.values.split(",")]
    v1 = [f for f in skab_files(SKAB) if f.parent.name == "valve1"]
    v2 = [f for f in skab_files(SKAB) if f.parent.name == "valve2"]
    print(f"knob {a.knob}, base {a.base}" + (", margin refitted per value" if a.refit else ""))
    print(f"{'model':<17} {'value':>8} {'margin':>6} | {'long run open':>13} {'alerts':>6} | "
          f"{'valve1 F1':>9} {'FAR':>6} | {'valve2 F1':>9} {'FAR':>6}")
    free = SKAB / "anomaly-free" / "anomaly-free.csv"
    for name in a.models.split(","):
        det = Detector(resolve_model(name))
        base = json.loads(a.base) if a.base != "policy" else \
            json.loads(json.dumps((det.meta.policy or {}).get("settings", {})))
        for v in values:
            over = setting(base, a.knob, v)
            if a.refit:
                best, _ = fit_margin(det, [free], over, LEARN)
                over = with_margin(det, over, best["margin"], LEARN)
            margin = over.get("calibration", {}).get("margin", float("nan"))
            share, alerts = long_run(det, over)
            r1, r2 = labeled(det, v1, over), labeled(det, v2, over)
            print(f"{name:<17} {str(v):>8} {margin:6.3g} | {100 * share:12.1f}% {alerts:6d} | "
                  f"{r1['f1']:9.3f} {100 * r1['far']:5.1f}% | {r2['f1']:9.3f} "
                  f"{100 * r2['far']:5.1f}%", flush=True)


if __name__ == "__main__":
    main()
