"""OpenVINO execution provider vs the CPU provider, as the agent calls them.

Runs inside .venv-openvino (export/recipes/openvino_env.sh), where `onnxruntime` is
the OpenVINO build and has both providers.  Every variant is an `agent.detector.Detector`
(max_batch 256), so sessions, provider options, warm-up and chunking are the agent's own;
VARIANTS lists them (providers, model.threads, extra OpenVINO options).

Per model, in one run, side by side:
  1. load: Detector construction (session + warm-up) in ms, after one untimed load;
     `ov+cache` is a load from a warm OpenVINO cache_dir.
  2. shapes: does a new batch size recompile?  `new size`: the extra ms of the first
     call at a batch size never seen before over an immediate repeat (median over 24
     sizes 2..255, fresh detectors).  `size change`: the extra ms of a call at a known
     small size (2..9) right after a call at another size, over the same call after
     one at the same size (median of 10 each, 5 pairs); `b2..9 ms` is the latter.
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
from agent.model_meta import PADDLEX_MODELS, load_meta  # noqa: E402

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
# (a, b): a call at size a right after size b, both sizes known (live traffic sizes)
CHANGE_PAIRS = [(2, 3), (4, 5), (5, 9), (9, 17), (3, 4)]
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
    """(median extra ms of the first call at a never-seen batch size over a repeat,
    median extra ms of a call at a known small size right after another size over the
    same call after the same size, median ms of those calls after the same size)."""
    first, change, same = [], [], []
    for sizes in NEW_SIZES:
        det = detector(path, variant)
        x = windows(det, max(sizes), 1)
        for s in sizes:
            f = ms(lambda: det.infer(x[:s]))
            first.append(f - ms(lambda: det.infer(x[:s])))
    for a, b in CHANGE_PAIRS:          # on the last trial's detector; untimed calls meet new sizes
        det.infer(x[:a])
        steady = statistics.median(ms(lambda: det.infer(x[:a])) for _ in range(10))
        switched = []
        for _ in range(10):
            det.infer(x[:b])
            switched.append(ms(lambda: det.infer(x[:a])))
        change.append(statistics.median(switched) - steady)
        same.append(steady)
    return statistics.median(first), statistics.median(change), statistics.median(same)


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
    ap.add_argument("--models", default=",".join(PADDLEX_MODELS))
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
        print(f"{'shape probe':<14} {'new size +ms':>12} {'size change +ms':>15} {'b2..9 ms':>9}")
        for v in names:
            f, r, rep = shape_costs(path, v)
            print(f"{v:<14} {f:12.2f} {r:15.3f} {rep:9.3f}")
        dets = {v: detector(path, v) for v in names}
        table, busy = per_window_us(dets, a.rounds, seed=len(model))
        print(f"{'µs/window':<14}" + "".join(f"{v:>20}" for v in names))
        for w, row in table.items():
            print(f"{w:<14}" + "".join(f"{us:11.1f} ({ratio:4.2f}x)" for us, ratio in row.values()))
        print(f"{'cores busy':<14}" + "".join(f"{busy[v]:20.2f}" for v in names))


if __name__ == "__main__":
    main()
