"""OpenVINO execution provider vs the CPU provider, as the agent calls them.

Runs inside .venv-openvino (export/recipes/openvino_env.sh), where `onnxruntime` is
the OpenVINO build and has both providers.  Every variant is an `agent.detector.Detector`
(max_batch 256), so sessions, provider options, warm-up and chunking are the agent's own;
VARIANTS lists them (providers, model.threads, extra OpenVINO options).

Per model, in one run, side by side:
  1. load: Detector construction (session + warm-up) in ms, after one untimed load;
     `ov+cache` is a load from a warm OpenVINO cache_dir.
  2. shapes: does a new batch size recompile?  On fresh detectors, per batch size never
     seen before: a first call, an immediate repeat, and a revisit after another size
     ran in between; reported as the extra ms of a first call and of a revisit over
     the repeat (medians over 24 sizes), and the repeat's ms.
  3. cost per window (µs) at fixed batch 1, 16, 256, and for two workloads whose batch
     size changes from call to call: `live 1..8` (a few streams, or a fast sensor,
     between two engine steps) and `bursty 1..256` (many streams, or a backlog after a
     stall; Engine.step hands the detector up to max_batch windows at once).  Rounds
     interleave the variants in shuffled order on the same sizes and inputs; a figure
     is the median over rounds, its ratio to `cpu` the median of the per-round ratios,
     so a machine whose speed changes mid-run moves both alike.  `cores busy` is the
     process CPU time over wall time across those workloads.

    .venv-openvino/bin/python benchmarks/bench_openvino.py [--models DLinear_ad,...] [--rounds 7]
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.detector import Detector  # noqa: E402
from agent.model_meta import load_meta  # noqa: E402

MODELS = ["AutoEncoder_ad", "DLinear_ad", "Nonstationary_ad", "PatchTST_ad", "TimesNet_ad"]
OV = "OpenVINOExecutionProvider"
BOUNDED = {"reshape_input": "{input}[1..{max_batch},{window},{channels}]"}
# variant -> (providers, model.threads, OpenVINO provider options); {input}, {window},
# {channels}, {max_batch} are the model's.  threads 0 = each provider's own default
# (ORT: one thread per core; OpenVINO: likewise, whatever model.threads says).
VARIANTS: dict[str, tuple[list[str], int, dict]] = {
    "cpu": (["cpu"], 1, {}),
    "ov": (["openvino", "cpu"], 1, {}),
    "cpu-threads0": (["cpu"], 0, {}),
    "ov-threads0": (["openvino", "cpu"], 0, {}),
    "ov-bounded": (["openvino", "cpu"], 1, BOUNDED),
}
# batch sizes a shape probe sees for the first time (the warm-up ran batch 1), one list per trial
NEW_SIZES = [[3, 5, 9, 17, 33, 65, 129, 200], [2, 6, 11, 23, 47, 97, 150, 255],
             [4, 7, 13, 29, 57, 111, 180, 240]]
MAX_BATCH = 256
# workload name -> (calls per round, batch size of each call from an rng)
WORKLOADS = {
    "b1": (200, lambda r: 1),
    "b16": (40, lambda r: 16),
    "b256": (4, lambda r: 256),
    "live 1..8": (150, lambda r: r.randint(1, 8)),
    "bursty 1..256": (12, lambda r: r.randint(1, 256)),
}


def detector(path: Path, variant: str, extra: dict | None = None) -> Detector:
    providers, threads, options = VARIANTS[variant]
    meta = load_meta(path)
    fill = {"input": meta.input_name, "window": meta.window, "channels": meta.n_channels,
            "max_batch": MAX_BATCH}
    opts = {k: v.format(**fill) for k, v in {**options, **(extra or {})}.items()}
    det = Detector(str(path), providers=providers, threads=threads, max_batch=MAX_BATCH,
                   provider_options={"openvino": opts})
    want = OV if providers[0] == "openvino" else "CPUExecutionProvider"
    if det.ep != want:
        sys.exit(f"{variant}: got {det.ep}, not {want}; run inside .venv-openvino")
    return det


def windows(det: Detector, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, det.window, det.n_channels)).astype(np.float32)


def ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def load_ms(path: Path, names: list[str]) -> dict[str, float]:
    out = {}
    for v in names:
        detector(path, v)
        out[v] = ms(lambda: detector(path, v))
    with tempfile.TemporaryDirectory() as cache:
        detector(path, "ov", {"cache_dir": cache})
        out["ov+cache"] = ms(lambda: detector(path, "ov", {"cache_dir": cache}))
    return out


def shape_costs(path: Path, variant: str) -> tuple[float, float, float]:
    """Median extra ms of a first call and of a revisit over a repeat, and the median repeat,
    over every size of every trial (a fresh detector per trial)."""
    first, revisit, repeat = [], [], []
    for sizes in NEW_SIZES:
        det = detector(path, variant)
        x = windows(det, max(sizes), 1)
        rep = {}
        for s in sizes:
            f = ms(lambda: det.infer(x[:s]))
            rep[s] = ms(lambda: det.infer(x[:s]))
            first.append(f - rep[s])
        for i, s in enumerate(sizes):
            det.infer(x[:sizes[i - 1]])       # another, known size in between
            revisit.append(ms(lambda: det.infer(x[:s])) - rep[s])
        repeat += rep.values()
    return statistics.median(first), statistics.median(revisit), statistics.median(repeat)


def per_window_us(dets: dict[str, Detector], rounds: int, seed: int) -> tuple[dict, dict]:
    """(workload -> variant -> (median µs per window, median ratio to cpu),
    variant -> cores busy)."""
    x = windows(dets["cpu"], MAX_BATCH, seed)
    table: dict[str, dict] = {}
    wall = {v: 0.0 for v in dets}
    busy = {v: 0.0 for v in dets}
    for name, (calls, size) in WORKLOADS.items():
        per: dict[str, list[float]] = {v: [] for v in dets}
        for r in range(rounds):
            rng = random.Random(seed * 1000 + r)
            sizes = [size(rng) for _ in range(calls)]
            order = list(dets)
            rng.shuffle(order)
            for v in order:
                det = dets[v]
                det.infer(x[:sizes[-1]])       # untimed: every variant starts from the same shape
                t, c = time.perf_counter(), time.process_time()
                for s in sizes:
                    det.infer(x[:s])
                t, c = time.perf_counter() - t, time.process_time() - c
                per[v].append(t * 1e6 / sum(sizes))
                wall[v] += t
                busy[v] += c
        table[name] = {v: (statistics.median(per[v]),
                           statistics.median(a / b for a, b in zip(per[v], per["cpu"])))
                       for v in dets}
    return table, {v: busy[v] / wall[v] for v in dets}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    if OV not in ort.get_available_providers():
        sys.exit(f"onnxruntime {ort.__version__} has no {OV}: run inside .venv-openvino "
                 f"(bash export/recipes/openvino_env.sh)")
    names = a.variants.split(",")
    if "cpu" not in names:
        sys.exit("--variants must include cpu, the reference of every ratio")
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  onnxruntime {ort.__version__} ({ort.__file__})")
    print(f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores visible, load average "
          f"{os.getloadavg()[0]:.1f}; {a.rounds} rounds")
    print("variants (providers, model.threads, OpenVINO options):")
    for v in names:
        print(f"  {v:<14} {VARIANTS[v]}")
    t = ms(lambda: detector(REPO / "models_onnx" / "DLinear_ad.onnx", "ov"))
    print(f"first OpenVINO load in the process (initialises the CPU plugin): {t:.0f} ms")
    for model in a.models.split(","):
        path = REPO / "models_onnx" / f"{model}.onnx"
        print(f"\n## {model}")
        loads = load_ms(path, names)
        print("load ms: " + ", ".join(f"{v} {t:.0f}" for v, t in loads.items()))
        print(f"{'shape probe':<14} {'first +ms':>9} {'revisit +ms':>11} {'repeat ms':>9}")
        for v in names:
            f, r, rep = shape_costs(path, v)
            print(f"{v:<14} {f:9.2f} {r:11.2f} {rep:9.2f}")
        dets = {v: detector(path, v) for v in names}
        table, busy = per_window_us(dets, a.rounds, seed=len(model))
        print(f"{'µs/window':<14}" + "".join(f"{v:>20}" for v in names))
        for w, row in table.items():
            print(f"{w:<14}" + "".join(f"{us:11.1f} ({ratio:4.2f}x)" for us, ratio in row.values()))
        print(f"{'cores busy':<14}" + "".join(f"{busy[v]:20.2f}" for v in names))


if __name__ == "__main__":
    main()
