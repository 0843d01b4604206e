"""`tsad-agent`: run the daemon, check a config, replay or evaluate files, run the demo."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__, logs, shipped
from .config import AgentConfig, ConfigError, load_config
from .shipped import DEMO_CSV

DEFAULT_MODEL = "DLinear_ad"


def resolve_model(name_or_path: str) -> str:
    """shipped.resolve_model; an unknown name ends the command with the list of shipped ones."""
    try:
        return shipped.resolve_model(name_or_path)
    except shipped.ShippedModelError as e:
        raise SystemExit(f"error: {e}") from None


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


# ---------------------------------------------------------------- commands
def cmd_check_config(a) -> int:
    try:
        cfg = load_config(a.config)
    except ConfigError as e:
        print(f"{a.config}: INVALID", file=sys.stderr)
        for p in e.problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    from .model_meta import ModelMetaError, load_meta
    try:
        meta = load_meta(cfg.model.path, verify_checksum=cfg.model.verify_checksum)
    except ModelMetaError as e:
        print(f"{a.config}: config valid, but model.path: {e}", file=sys.stderr)
        return 1
    print(f"{a.config}: OK — node {cfg.node}, {len(cfg.streams)} stream(s), model {meta.name} "
          f"(window {meta.window}, {meta.n_channels} channels), "
          f"mqtt {'%s:%d' % (cfg.mqtt.host, cfg.mqtt.port) if cfg.mqtt.enabled else 'disabled'}")
    return 0


def cmd_run(a) -> int:
    try:
        cfg = load_config(a.config)
    except ConfigError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2
    logs.setup(cfg.log_level)
    from .daemon import Daemon
    from .detector import DetectorError
    from .model_meta import ModelMetaError
    try:
        d = Daemon(a.config, cfg)
    except ConfigError as e:      # settings only checkable at use: password/TLS files
        return _fail("; ".join(e.problems))
    except (DetectorError, ModelMetaError) as e:
        return _fail(str(e), 1)
    return d.serve()


def _results_csv(path: Path, rec: dict) -> None:
    import pandas as pd
    pd.DataFrame({"timestamp": pd.to_datetime(rec["ts"], unit="s").strftime("%Y-%m-%d %H:%M:%S"),
                  "score": rec["score"], "label": rec["label"].astype(int),
                  "alert": rec["alert"].astype(int)}).to_csv(path, index=False, float_format="%.6g")


def _replay(cfg: AgentConfig):
    """Run a finite (replay) config to its end with its sinks plus a recorder."""
    from .metrics import Metrics
    from .pipeline import Pipeline
    from .sinks.build import build_sinks
    from .sinks.record import RecordSink
    metrics = Metrics()
    rec = RecordSink()
    p = Pipeline(cfg, build_sinks(cfg, metrics) + [rec], metrics=metrics)
    p.start()
    try:
        p.run(until_exhausted=True)
    except KeyboardInterrupt:
        pass
    p.stop()
    return p, rec


def cmd_replay(a) -> int:
    logs.setup(a.log_level)
    from .evaluate import replay_config
    model = resolve_model(a.model)
    overrides = {"sinks": {"console": {"enabled": not a.quiet},
                           **({"jsonl": {"path": a.alerts}} if a.alerts else {})},
                 "streams": [{"id": a.stream, "source": {"type": "replay", "path": a.file,
                                                         "speed": a.speed}}]}
    try:
        cfg = replay_config(a.file, model, a.calibrate or None, overrides)
    except Exception as e:   # pydantic ValidationError: the CLI built it, show it plainly
        return _fail(str(e))
    p, rec = _replay(cfg)
    if a.out:
        _results_csv(Path(a.out), rec.table(a.stream))
    h = p.health()
    print(f"replayed {h['samples_in']} samples, {h['windows_inferred']} windows, "
          f"{len(rec.alerts)} alert events; malformed {h['malformed'] or 0}"
          + (f"; per-window results in {a.out}" if a.out else ""), file=sys.stderr)
    return 0


def cmd_evaluate(a) -> int:
    logs.setup(a.log_level)
    from .evaluate import evaluate, skab_files
    files: list[Path] = []
    for p in map(Path, a.paths):
        if p.is_dir():
            files += skab_files(p) if any(q.is_dir() for q in p.iterdir()) else sorted(p.glob("*.csv"))
        elif p.is_file():
            files.append(p)
        else:
            return _fail(f"{p}: no such file or directory")
    if not files:
        return _fail("no CSV files to evaluate")
    overrides = {}
    if a.smoothing:
        overrides["scoring"] = {"smoothing": a.smoothing}
    cal = {k: v for k, v in (("quantile", a.quantile), ("margin", a.margin),
                             ("std_floor", a.std_floor)) if v is not None}
    if cal:
        overrides["calibration"] = cal
    results = []
    for m in a.model:
        r = evaluate(files, resolve_model(m), a.calibration, by=a.by,
                     out_dir=Path(a.out) / Path(resolve_model(m)).stem if a.out else None,
                     overrides=overrides)
        results.append(r)
        if not a.json:
            print(f"{r['model']:<18} files={r['files']}  P={r['precision']:.3f} "
                  f"R={r['recall']:.3f} F1={r['f1']:.3f} FAR={100 * r['far']:.2f}% "
                  f"MAR={100 * r['mar']:.2f}%  (TP={r['tp']} FP={r['fp']} TN={r['tn']} "
                  f"FN={r['fn']})")
    if a.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    return 0


def cmd_demo(a) -> int:
    logs.setup(a.log_level)
    from .evaluate import Counts, replay_config, rows_prediction
    from .contract import read_table
    model = resolve_model(a.model)
    print(f"tsad-agent demo: replaying {DEMO_CSV.name} (SKAB valve1/1, water pump, 8 sensors) "
          f"through {Path(model).stem}; calibrating on the first 400 rows, then detecting.",
          file=sys.stderr)
    overrides = {"node": "demo",
                 "streams": [{"id": "pump", "source": {"type": "replay", "path": str(DEMO_CSV),
                                                       "speed": a.speed}}],
                 "sinks": {"console": {"enabled": True, "format": "json" if a.json else "text"}}}
    if a.mqtt:
        host, _, port = a.mqtt.partition(":")
        overrides["mqtt"] = {"enabled": True, "host": host, "port": int(port or 1883)}
    cfg = replay_config(str(DEMO_CSV), model, 400, overrides, node="demo")
    p, rec = _replay(cfg)
    t = read_table(DEMO_CSV, p.meta.channels)
    row_ts, labels = t.ts, t.labels
    pred = rows_prediction(row_ts, rec.table("pump"), "alert")
    c = Counts()
    c.add(labels[400:], pred[400:])
    s = c.summary()
    lab = labels.nonzero()[0]
    print(f"labeled anomaly: rows {lab.min()}-{lab.max()}; alert events: "
          f"{sum(1 for e in rec.alerts if e['type'] == 'new')} opened, "
          f"{sum(1 for e in rec.alerts if e['type'] == 'end')} closed; on this file: "
          f"precision {s['precision']:.2f}, recall {s['recall']:.2f}, F1 {s['f1']:.2f}, "
          f"FAR {100 * s['far']:.1f}%", file=sys.stderr)
    return 0


def cmd_predict(a) -> int:
    from .detector import Detector, DetectorError
    from .model_meta import ModelMetaError
    from .predict import PredictError, input_files, predict, write_outputs
    logs.setup(a.log_level)
    try:
        files = input_files(a.input)
        det = Detector(resolve_model(a.model))
    except (PredictError, DetectorError, ModelMetaError) as e:
        return _fail(str(e), 1)
    failed = 0
    for f in files:
        try:
            pred = predict(f, det, a.calibrate, a.paddlex_compat, a.max_gap)
            out = write_outputs(pred, a.save_path, a.plot)
        except (PredictError, DetectorError) as e:
            failed += 1
            _fail(str(e))
            continue
        lab = pred.label[pred.rows]
        print(f"{f}: {len(lab)} row(s) written, {int(lab.sum())} anomalous "
              f"(threshold {pred.threshold:.4g}) -> {', '.join(str(o) for o in out)}",
              file=sys.stderr)
    return 1 if failed else 0


def cmd_serve(a) -> int:
    from .http_api import ApiError, serve
    logs.setup(a.log_level)
    try:
        return serve(resolve_model(a.model), host=a.host, port=a.port,
                     api_key_env=a.api_key_env, api_key_file=a.api_key_file,
                     calibrate=a.calibrate, compat=a.paddlex_compat, max_gap=a.max_gap,
                     visualize=a.visualize)
    except ApiError as e:
        return _fail(str(e), 1)


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tsad-agent", description=__doc__)
    ap.add_argument("--version", action="version", version=f"tsad-agent {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("run", help="run the daemon")
    s.add_argument("--config", "-c", required=True)
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("check-config", help="validate a config file (and its model)")
    s.add_argument("config")
    s.set_defaults(fn=cmd_check_config)

    s = sub.add_parser("replay", help="replay a CSV through the pipeline")
    s.add_argument("file")
    s.add_argument("--model", "-m", default=DEFAULT_MODEL)
    s.add_argument("--calibrate", type=int, default=400, metavar="N",
                   help="fit scaler+threshold on the first N rows (0: use the model's)")
    s.add_argument("--speed", type=float, default=0.0, help="0 = full speed, else real time x S")
    s.add_argument("--out", help="per-window CSV: timestamp,score,label,alert")
    s.add_argument("--alerts", help="append alert events to this JSON-lines file")
    s.add_argument("--stream", default="replay")
    s.add_argument("--quiet", "-q", action="store_true", help="no console alert lines")
    s.add_argument("--log-level", default="warning")
    s.set_defaults(fn=cmd_replay)

    s = sub.add_parser("evaluate", help="SKAB-protocol evaluation through the live pipeline")
    s.add_argument("paths", nargs="+", help="labeled CSV files or folders (e.g. ../shared/data/skab)")
    s.add_argument("--model", "-m", action="append", required=True,
                   help="model name or path (repeat for several)")
    s.add_argument("--calibration", type=int, default=400)
    s.add_argument("--by", choices=["alert", "label"], default="alert",
                   help="row prediction: alert open (hysteresis) or raw score >= threshold")
    s.add_argument("--smoothing", type=int)
    s.add_argument("--quantile", type=float)
    s.add_argument("--margin", type=float)
    s.add_argument("--std-floor", type=float, help="calibration std floor (x model std)")
    s.add_argument("--out", help="write per-file predictions datetime,anomaly under this folder")
    s.add_argument("--json", action="store_true")
    s.add_argument("--log-level", default="warning")
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("demo", help="replay a shipped pump recording through a shipped model")
    s.add_argument("--model", "-m", default=DEFAULT_MODEL)
    s.add_argument("--speed", type=float, default=0.0, help="0 = full speed, else real time x S")
    s.add_argument("--mqtt", metavar="HOST[:PORT]", help="also publish to this broker")
    s.add_argument("--json", action="store_true", help="alerts as JSON lines")
    s.add_argument("--log-level", default="warning")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("predict", help="label every row of CSV files (PaddleX-style outputs)",
                       description="Writes <stem>_res.csv (timestamp,label), <stem>_res.json "
                       "(threshold, per-row label and score) and with --plot <stem>_res.png. "
                       "The label is the raw one, score >= threshold (like evaluate --by label), "
                       "not the alert hysteresis. Rows before the first full window are 0.")
    s.add_argument("--input", "-i", required=True, help="a CSV file or a folder of them")
    s.add_argument("--model", "-m", default=DEFAULT_MODEL)
    s.add_argument("--save_path", "--save-path", default="./output", help="output folder")
    s.add_argument("--calibrate", type=int, metavar="N",
                   help="fit scaler+threshold on each file's first N rows, which are then "
                        "not labelled (0: the model's; default: the model metadata's "
                        "training.calibration_rows, else 0)")
    s.add_argument("--plot", action="store_true", help="also write a PNG (needs matplotlib)")
    s.add_argument("--paddlex-compat", action="store_true",
                   help="like PaddleX: score and label only the last window's rows")
    s.add_argument("--max-gap", type=float, default=2.5, metavar="K",
                   help="reject steps over K x the median step (1.5 = strictly regular; 0 = off)")
    s.add_argument("--log-level", default="warning")
    s.set_defaults(fn=cmd_predict)

    s = sub.add_parser("serve", help="local HTTP API (PaddleX serving endpoint, /anomaly, "
                                     "/healthz, /metrics, /openapi.json)")
    s.add_argument("--model", "-m", default=DEFAULT_MODEL)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--api-key-env", metavar="NAME", help="require this env variable's value "
                   "as X-API-Key or Authorization: Bearer (not for /healthz, /openapi.json)")
    s.add_argument("--api-key-file", metavar="PATH", help="same, key read from a file")
    s.add_argument("--calibrate", type=int, metavar="N",
                   help="calibrate on the first N rows of each file / stream (0: the model's; "
                        "default as in predict)")
    s.add_argument("--paddlex-compat", action="store_true",
                   help="the PaddleX endpoint labels only the last window's rows")
    s.add_argument("--max-gap", type=float, default=2.5, metavar="K")
    s.add_argument("--visualize", action="store_true",
                   help="PaddleX endpoint returns a PNG too (needs matplotlib)")
    s.add_argument("--log-level", default="info")
    s.set_defaults(fn=cmd_serve)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
