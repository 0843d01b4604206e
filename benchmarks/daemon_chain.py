"""A folder of back-to-back recordings as one daemon would see them: one stream, one
learning period, every fault in turn.

    python benchmarks/daemon_chain.py [FOLDER ...] [--models DLinear_ad,...]

SKAB's valve1 files are one 5.3-hour recording of the same pump, cut into 16 pieces of
20 minutes, each holding one valve fault about 10 minutes in (valve2: 4 pieces).  The SKAB
protocol learns a baseline on each piece's first 400 rows, so every fault comes about 3
minutes after a fresh learning period.  A daemon learns once and then meets the faults
one after the other, with its baseline adapted through everything before them.  This joins
the pieces in time order (refusing overlapping ones) and evaluates the whole as one
stream with each model's own policy, beside the per-piece figures, as `tsad-agent
evaluate` computes both.  It also gives, per channel, how far the stream's typical error
(which divides each channel's error in the score, `scoring.normalize: channel`) had grown
by the end, against the one it learned.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.contract import load_csv, read_table, time_column  # noqa: E402
from agent.detector import Detector  # noqa: E402
from agent.engine import Engine  # noqa: E402
from agent.evaluate import evaluate  # noqa: E402
from agent.jobs import detection_config, run_table  # noqa: E402
from agent.model_meta import PADDLEX_MODELS  # noqa: E402
from agent.shipped import resolve_model  # noqa: E402

SKAB = REPO.parent / "shared" / "data" / "skab"


def chain(folder: Path, out: Path) -> Path:
    """The folder's CSV files joined in time order into `out` (ValueError if two overlap)."""
    import pandas as pd
    parts = [load_csv(p) for p in sorted(folder.glob("*.csv"))]
    if not parts:
        raise ValueError(f"{folder}: no CSV files")
    tcol = time_column(parts[0].columns)
    parts.sort(key=lambda d: pd.to_datetime(d[tcol].iloc[0]))
    for a, b in zip(parts, parts[1:]):
        if pd.to_datetime(b[tcol].iloc[0]) <= pd.to_datetime(a[tcol].iloc[-1]):
            raise ValueError(f"{folder}: recordings overlap at {b[tcol].iloc[0]}")
    pd.concat(parts, ignore_index=True).to_csv(out, sep=";", index=False)
    return out


def level_growth(path: Path, det: Detector) -> np.ndarray | None:
    """Per channel, the adapted typical error at the end ÷ the learned one (None: the
    policy keeps no per-channel level)."""
    t = read_table(path, det.meta.channels)
    engine = Engine(detection_config(det.meta), det)
    run_table(engine, "s", t.ts, t.values)
    st = engine.streams["s"]
    if st.adapter is None or st.adapter.level is None:
        return None
    return st.adapter.level / st.baseline.level


def figures(report: dict) -> str:
    ev = [e for f in report["per_file"] for e in f.get("events", [])]
    found = sum(e["delay_s"] is not None for e in ev)
    return f"F1 {report['f1']:.3f} FAR {100 * report['far']:5.2f} % events {found:>2}/{len(ev):<2}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", type=Path, default=[SKAB / "valve1"])
    ap.add_argument("--models", default=",".join(PADDLEX_MODELS))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for folder in a.folders:
            try:
                joined = chain(folder, Path(tmp) / f"{folder.name}_chain.csv")
            except (OSError, ValueError) as e:
                print(e, file=sys.stderr)
                return 2
            files = sorted(folder.glob("*.csv"))
            print(f"{folder.name}: {len(files)} recordings, per piece (SKAB protocol) | joined "
                  f"as one stream | typical error at the end ÷ learned, per channel")
            for model in a.models.split(","):
                det = Detector(resolve_model(model))
                per = evaluate(files, model, detector=det)
                one = evaluate([joined], model, detector=det)
                growth = level_growth(joined, det)
                g = "-" if growth is None else " ".join(f"{v:.0f}" for v in growth)
                print(f"  {model:<17} {figures(per)} | {figures(one)} | {g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
