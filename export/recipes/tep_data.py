"""Tennessee Eastman runs as the agent's labeled CSV files, seeded and byte-reproducible.

    python -m export.recipes.tep_data --out runs/tep [--sets train val test] [--workers 2]
    python -m export.recipes.tep_data --out runs/tep --sets months --workers 2

Needs the `[bench]` extra (tep-studio, which compiles the modified TEP in C on install).

Rules:
- Four disjoint seed sets, fixed here: TRAIN (fault-free only: the models and the PCA
  references are fitted on it), VAL (fault-free, plus one seed of every fault: the only
  runs settings may be chosen on), TEST (28 faults x 3 seeds and three 7-day fault-free
  runs: scored, never tuned on).  A test seed is never a training or validation seed.
  MONTHS (three 90-day fault-free runs, seeds 4xx) is the months-long check of a
  deployed stream (benchmarks/long_normal.py), also never tuned on.
- Every run is closed loop, mode 1, one sample every SAMPLING_MIN minutes; faults start
  at ONSET_H hours, magnitude 1, and stay on.
- One CSV per run: `datetime` (ISO 8601 UTC, START + the simulated time rounded to the
  second), then the 52 `classic52` channels named and ordered exactly as
  `tep_studio.simulation.benchmark.feature_columns("classic52")`, then `anomaly` (1 on
  every row at or after the fault onset, 0 before and on fault-free runs).
- A run the plant shuts down early is kept as it is (fewer rows; `terminated` in the
  manifest).
- `manifest.json` lists every file: set, seed, fault, onset, hours, rows, terminated and
  sha256.  Same seeds, same machine: same bytes (the simulator is deterministic per seed;
  floats are written with Python's shortest round-trip repr).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

SAMPLING_MIN = 3.0
ONSET_H = 8.0
FAULT_H = 48.0
DAY_H = 24.0
START = pd.Timestamp("2024-01-01T00:00:00Z")
FAULT_FREE = "fault_free"
FAULTS = tuple(f"idv_{i:02d}" for i in range(1, 29))


@dataclass(frozen=True)
class RunSpec:
    set: str          # train | val | test
    fault: str        # FAULT_FREE or idv_NN
    seed: int
    hours: float

    @property
    def onset_h(self) -> float | None:
        return None if self.fault == FAULT_FREE else ONSET_H

    @property
    def name(self) -> str:
        return f"{self.set}/{self.fault}_s{self.seed}_{int(self.hours)}h.csv"


# VAL's plant starts: one-day fault-free runs on their own seeds.  A fault run's hours
# before its onset are exactly the first hours of the fault-free run of its seed, and a
# fresh start settles for about ten hours, so its false alerts are a property of starts:
# the policy's start criterion (fit_policies.py) is fitted on many of them, never on
# the three test seeds' eight pre-onset hours.
STARTS = tuple(range(221, 261))

# TRAIN's plant starts: one-day fault-free runs on their own seeds, so that the ten hours
# of settling after a start are normal to the models (with eight starts in 26 days they
# were 3 % of the training rows, and the models flagged them).
TRAIN_STARTS = tuple(range(121, 161))

# Seed sets, disjoint by construction (1xx, 2xx, 3xx, 4xx).  TRAIN: 66 simulated days of
# normal operation, six 48-hour runs, two 7-day runs (the slow wander of a week) and
# the 40 one-day starts: 48 plant starts in all, like the fault runs' first hours.
TRAIN = ([RunSpec("train", FAULT_FREE, s, FAULT_H) for s in range(101, 107)]
         + [RunSpec("train", FAULT_FREE, s, 7 * DAY_H) for s in (107, 108)]
         + [RunSpec("train", FAULT_FREE, s, DAY_H) for s in TRAIN_STARTS])
VAL = ([RunSpec("val", FAULT_FREE, s, FAULT_H) for s in (201, 202)]
       + [RunSpec("val", FAULT_FREE, 203, 7 * DAY_H)]
       + [RunSpec("val", f, 211, FAULT_H) for f in FAULTS]
       + [RunSpec("val", FAULT_FREE, s, DAY_H) for s in STARTS])
TEST = ([RunSpec("test", f, s, FAULT_H) for f in FAULTS for s in (301, 302, 303)]
        + [RunSpec("test", FAULT_FREE, s, 7 * DAY_H) for s in (311, 312, 313)])
# A daemon runs for months: three quarters of normal running on seeds of their own.
MONTHS = [RunSpec("months", FAULT_FREE, s, 90 * DAY_H) for s in (401, 402, 403)]
SETS = {"train": TRAIN, "val": VAL, "test": TEST, "months": MONTHS}


def classic52() -> list[str]:
    from tep_studio.simulation.benchmark import feature_columns
    return feature_columns("classic52")


def to_labeled_frame(frame: pd.DataFrame, channels: list[str],
                     onset_h: float | None) -> pd.DataFrame:
    """tep-studio's run frame -> the agent's labeled table (module rules).

    `frame` needs `time` (hours) and every name in `channels`; other columns are dropped."""
    missing = [c for c in ["time", *channels] if c not in frame.columns]
    if missing:
        raise ValueError(f"run frame lacks column(s) {missing}")
    seconds = np.rint(frame["time"].to_numpy(np.float64) * 3600.0).astype(np.int64)
    out = pd.DataFrame({"datetime": (START + pd.to_timedelta(seconds, unit="s"))
                        .strftime("%Y-%m-%dT%H:%M:%SZ")})
    out = pd.concat([out, frame[channels].reset_index(drop=True).astype(np.float64)], axis=1)
    onset_s = None if onset_h is None else int(round(onset_h * 3600.0))
    out["anomaly"] = 0 if onset_s is None else (seconds >= onset_s).astype(np.int8)
    return out


def simulate(spec: RunSpec) -> tuple[pd.DataFrame, bool]:
    """One run through tep-studio's FDD benchmark generator: (labeled frame, terminated)."""
    from tep_studio.simulation.benchmark import make_fdd_benchmark
    faulty = spec.fault != FAULT_FREE
    bench = make_fdd_benchmark(faults=(spec.fault,) if faulty else (),
                               include_fault_free=not faulty, seeds=(float(spec.seed),),
                               onset_h=ONSET_H, horizon_h=spec.hours, sampling_min=SAMPLING_MIN)
    (run,) = bench.runs
    if run.fault_label != spec.fault:
        raise RuntimeError(f"tep-studio returned {run.fault_label!r} for {spec.fault!r}")
    return to_labeled_frame(run.run.to_frame(), classic52(), spec.onset_h), bool(run.run.terminated)


def write_run(spec: RunSpec, out: Path) -> dict:
    frame, terminated = simulate(spec)
    path = out / spec.name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    frame.to_csv(tmp, index=False, lineterminator="\n")
    tmp.replace(path)
    return {"file": spec.name, **asdict(spec), "onset_h": spec.onset_h, "rows": len(frame),
            "terminated": terminated, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def generate(out: Path, sets: list[str], workers: int = 1) -> dict:
    specs = [s for name in sets for s in SETS[name]]
    out.mkdir(parents=True, exist_ok=True)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(write_run, specs, [out] * len(specs)))
    else:
        rows = [write_run(s, out) for s in specs]
    import tep_studio
    manifest = {"generator": f"tep-studio {getattr(tep_studio, '__version__', '?')}",
                "sampling_min": SAMPLING_MIN, "onset_h": ONSET_H, "start": START.isoformat(),
                "channels": "feature_columns('classic52')", "files": rows}
    path = out / "manifest.json"
    if path.exists():       # keep the entries of sets not regenerated this time
        old = json.loads(path.read_text())
        rows += [r for r in old.get("files", []) if r["set"] not in sets]
    rows.sort(key=lambda r: r["file"])
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/tep")
    # MONTHS only on request: nothing is fitted on it, and it is most of the simulation time
    ap.add_argument("--sets", nargs="+", choices=sorted(SETS), default=["train", "val", "test"])
    ap.add_argument("--workers", type=int, default=1, help="runs simulated in parallel")
    a = ap.parse_args(argv)
    try:
        import tep_studio  # noqa: F401
    except ImportError:
        print("tep_data: tep-studio is not installed: pip install -e '.[bench]' "
              "(it compiles C: needs a C compiler)", file=sys.stderr)
        return 1
    m = generate(Path(a.out), a.sets, a.workers)
    print(f"tep_data: {len(m['files'])} files in {a.out} (manifest.json)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
