"""`tsad-agent`: run the daemon, check a config, replay or evaluate files, run the demo,
send operator commands to a running agent.

Errors: one line on stderr starting with `error: `, never a traceback for anything the
user can fix.  Exit 2: the command cannot start (a bad flag or value, an unknown model
name, a missing or unusable input file, a config or model `run` refuses: the unit's
RestartPreventExitStatus=2 fails once, as no restart mends them).  Exit 1: the work ran
into a problem (check-config: INVALID; predict: a file refused; the file commands: a
model that does not load or fails its checksum).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from . import __version__, logs, remote, shipped
from .cli_args import Parser, gap_factor, running_flags
from .config import ConfigError, load_config
from .preflight import config_file_problem, reason
from .shipped import DEMO_CSV

DEFAULT_MODEL = "DLinear_ad"


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def resolve_model(name_or_path: str) -> str:
    """shipped.resolve_model; an unknown name ends the command (exit 2) with the list of
    shipped ones."""
    try:
        return shipped.resolve_model(name_or_path)
    except shipped.ShippedModelError as e:
        raise SystemExit(_fail(str(e))) from None


# ---------------------------------------------------------------- commands
def _invalid(path: str, problems: list[str], why: str = "") -> int:
    print(f"{path}: INVALID{why}", file=sys.stderr)
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    return 1


def cmd_check_config(a) -> int:
    """Exit 0: `run` would start (warnings and notes allowed); 1: INVALID, every problem listed."""
    if problem := config_file_problem(a.config):
        return _fail(problem)
    try:
        cfg = load_config(a.config)
    except ConfigError as e:
        return _invalid(a.config, e.problems)
    from .detector import Detector, DetectorError
    from .preflight import check
    try:
        meta = Detector.from_config(cfg.model).meta
    except DetectorError as e:
        print(f"{a.config}: config valid, but model.path: {e}", file=sys.stderr)
        return 1
    found = check(cfg, meta, probe_listen=True)
    for w in found.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for n in found.notes:
        print(f"note: {n}", file=sys.stderr)
    if found.problems:
        return _invalid(a.config, found.problems, ": `run` would refuse to start")
    print(f"{a.config}: OK — node {cfg.node}, {len(cfg.streams)} stream(s), model {meta.name} "
          f"(window {meta.window}, {meta.n_channels} channels), "
          f"mqtt {'%s:%d' % (cfg.mqtt.host, cfg.mqtt.port) if cfg.mqtt.enabled else 'disabled'}")
    return 0


def cmd_run(a) -> int:
    # SIGHUP's default action ends the process, and loading and warming a model takes
    # minutes on a small board: a reload asked for meanwhile (kill -HUP, a config tool)
    # is remembered and carried out once the agent runs.
    reload = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    if problem := config_file_problem(a.config):
        return _fail(problem)
    try:
        cfg = load_config(a.config)
    except ConfigError as e:
        return _fail(reason(e))
    logs.setup(cfg.log_level)
    from .daemon import Daemon
    from .detector import DetectorError
    from .model_meta import ModelMetaError
    from .outbox import OutboxError
    try:
        d = Daemon(a.config, cfg, reload)
    except (DetectorError, ModelMetaError) as e:
        return _fail(str(e))
    except (ConfigError, OutboxError, OSError, ValueError) as e:   # preflight.check's problems
        return _fail(reason(e))
    return d.serve()


def cmd_replay(a) -> int:
    logs.setup(a.log_level)
    from .jobs import file_config, flag_overrides, replay_config, replay_line, write_results_csv
    overrides = {"sinks": {"console": {"enabled": not a.quiet},
                           **({"jsonl": {"path": a.alerts}} if a.alerts else {})}}
    model = resolve_model(a.model)
    try:
        overrides.update(flag_overrides(running=a.running, running_start_s=a.running_start_s))
        cfg = file_config(a.file, model, a.calibrate, overrides, stream=a.stream,
                          speed=a.speed)
        engine, rec = replay_config(cfg, _detector(model))
        if a.out:
            write_results_csv(Path(a.out), rec.table(a.stream))
    except (OSError, ValueError) as e:
        return _fail(reason(e))
    print(replay_line(engine, rec, a.stream)
          + (f"; per-window results in {a.out}" if a.out else ""), file=sys.stderr)
    return 0


def cmd_evaluate(a) -> int:
    logs.setup(a.log_level)
    from .evaluate import evaluate, evaluation_files, format_summary
    from .jobs import flag_overrides
    try:
        files = evaluation_files([Path(p) for p in a.paths])
    except ValueError as e:
        return _fail(str(e))
    try:
        overrides = flag_overrides(a.smoothing, a.quantile, a.margin, a.std_floor, a.running,
                                   a.running_start_s)
    except ValueError as e:
        return _fail(str(e))
    results = []
    for m in a.model:
        model = resolve_model(m)
        try:
            r = evaluate(files, model, a.calibration, by=a.by,
                         out_dir=Path(a.out) / Path(model).stem if a.out else None,
                         overrides=overrides, detector=_detector(model))
        except (OSError, ValueError) as e:
            return _fail(reason(e))
        results.append(r)
        if not a.json:
            print(format_summary(r))
    if a.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    return 0


def cmd_demo(a) -> int:
    logs.setup(a.log_level)
    from .evaluate import file_score
    from .jobs import file_config, replay_config
    model = resolve_model(a.model)
    overrides = {"sinks": {"console": {"enabled": True, "format": "json" if a.json else "text"}}}
    if a.mqtt:
        host, _, port = a.mqtt.partition(":")
        if port and not port.isdigit():
            return _fail(f"--mqtt {a.mqtt}: expected HOST or HOST:PORT")
        overrides["mqtt"] = {"enabled": True, "host": host, "port": int(port or 1883)}
    try:
        cfg = file_config(DEMO_CSV, model, 400, overrides, node="demo", stream="pump",
                          speed=a.speed)
        detector = _detector(model)
        print(f"tsad-agent demo: replaying {DEMO_CSV.name} (SKAB valve1/1, water pump, "
              f"8 sensors) through {Path(model).stem}; calibrating on the first 400 rows, "
              f"then detecting.", file=sys.stderr)
        _, rec = replay_config(cfg, detector)
    except (OSError, ValueError) as e:
        return _fail(reason(e))
    s = file_score(DEMO_CSV, detector.meta.channels, rec, "pump", 400)
    print(f"labeled anomaly: rows {s['first_labeled']}-{s['last_labeled']}; alert events: "
          f"{s['opened']} opened, {s['closed']} closed; on this file: "
          f"precision {s['precision']:.2f}, recall {s['recall']:.2f}, F1 {s['f1']:.2f}, "
          f"FAR {100 * s['far']:.1f}%", file=sys.stderr)
    return 0


def _detector(model: str):
    from .detector import Detector, DetectorError
    try:
        return Detector(model)
    except DetectorError as e:
        raise SystemExit(_fail(str(e), 1)) from None


def cmd_predict(a) -> int:
    from .detector import DetectorError
    from .model_meta import ModelMetaError
    from .predict import PredictError, predict_files
    logs.setup(a.log_level)
    try:
        failed = predict_files(a.input, resolve_model(a.model), a.save_path, a.calibrate,
                               a.paddlex_compat, a.max_gap, a.plot,
                               report=lambda line: print(line, file=sys.stderr), fail=_fail)
    except (DetectorError, ModelMetaError) as e:
        return _fail(str(e), 1)
    except (PredictError, OSError) as e:    # no input files, an unwritable --save_path
        return _fail(reason(e))
    return 1 if failed else 0


def cmd_fit_policy(a) -> int:
    logs.setup(a.log_level)
    from .detector import DetectorError
    from .policy_fit import fit_policy, parse_settings
    from .policy_store import write_policy
    try:
        settings = parse_settings(a.set)
    except ValueError as e:
        return _fail(reason(e))
    model = resolve_model(a.model)
    try:
        policy = fit_policy(model, [Path(f) for f in a.data], settings, a.learn, a.reason,
                            a.alerts_per_day, a.open_share, starts=[Path(f) for f in a.starts],
                            start_h=a.start_hours, start_quantile=a.start_quantile,
                            safety=a.safety)
        written = write_policy(model, policy) if a.write else None
    except DetectorError as e:
        return _fail(str(e), 1)
    except (OSError, ValueError) as e:
        return _fail(reason(e))
    r, rf = policy["fitted"]["result"], policy["fitted"].get("refine", {}).get("result")
    print(f"{Path(model).stem}: margin {r['margin']:g} -> {r['alerts']} alert(s) in {r['hours']} h "
          f"of normal running, alert open on {100 * r['open_share']:.2f}% of its rows"
          + (f"; refinement margin {rf['margin']:g}" if rf else ""), file=sys.stderr)
    if (running := policy["fitted"].get("running")) is not None:
        from .running import condition
        print(f"fitted while {condition(running['channel'], running.get('above'), running.get('below'))}"
              f": set the same running: in the agent's config (a policy holds no plant's "
              f"channel)", file=sys.stderr)
    if written:
        print(f"policy written to {written}", file=sys.stderr)
    else:
        print(json.dumps(policy, indent=2))
    return 0


def cmd_serve(a) -> int:
    from .http.server import ApiError, serve
    logs.setup(a.log_level)
    try:
        return serve(resolve_model(a.model), host=a.host, port=a.port,
                     api_key_env=a.api_key_env, api_key_file=a.api_key_file,
                     calibrate=a.calibrate, compat=a.paddlex_compat, max_gap=a.max_gap,
                     visualize=a.visualize)
    except ApiError as e:      # API key, port, model or matplotlib: nothing served
        return _fail(str(e))


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="tsad-agent", description=__doc__)
    ap.add_argument("--version", action="version", version=f"tsad-agent {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("run", help="run the daemon")
    s.add_argument("--config", "-c", required=True)
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("check-config", help="validate a config file (and its model)")
    s.add_argument("config")
    s.set_defaults(fn=cmd_check_config)

    _file_commands(sub)
    _model_commands(sub)
    remote.add_parsers(sub)
    return ap


def _file_commands(sub) -> None:
    s = sub.add_parser("replay", help="replay a CSV through the pipeline")
    s.add_argument("file")
    s.add_argument("--model", "-m", default=DEFAULT_MODEL)
    s.add_argument("--calibrate", type=int, metavar="N",
                   help="learn on the first N rows (default: the model's policy, as evaluate; "
                        "0: the bare model, its own scaler and threshold)")
    s.add_argument("--speed", type=float, default=0.0, help="0 = full speed, else real time x S")
    s.add_argument("--out", help="per-window CSV: timestamp,score,label,alert")
    s.add_argument("--alerts", help="append alert events to this JSON-lines file")
    s.add_argument("--stream", default="replay")
    s.add_argument("--quiet", "-q", action="store_true", help="no console alert lines")
    s.add_argument("--log-level", default="warning")
    s.set_defaults(fn=cmd_replay)
    running_flags(s)

    s = sub.add_parser("evaluate", help="SKAB-protocol evaluation through the live pipeline")
    s.add_argument("paths", nargs="+", help="labeled CSV files or folders (e.g. ../shared/data/skab)")
    s.add_argument("--model", "-m", action="append", required=True,
                   help="model name or path (repeat for several)")
    s.add_argument("--calibration", type=int, metavar="N",
                   help="learn on each file's first N rows (0: none; default: the model's policy)")
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
    running_flags(s)

    s = sub.add_parser("demo", help="replay a shipped pump recording through a shipped model")
    s.add_argument("--model", "-m", default=DEFAULT_MODEL)
    s.add_argument("--speed", type=float, default=0.0, help="0 = full speed, else real time x S")
    s.add_argument("--mqtt", metavar="HOST[:PORT]", help="also publish to this broker")
    s.add_argument("--json", action="store_true", help="alerts as JSON lines")
    s.add_argument("--log-level", default="warning")
    s.set_defaults(fn=cmd_demo)


def _model_commands(sub) -> None:
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
                        "not labelled (0: the model's; default: the learning period of the "
                        "model's policy, else training.calibration_rows, else 0)")
    s.add_argument("--plot", action="store_true", help="also write a PNG (needs matplotlib)")
    s.add_argument("--paddlex-compat", action="store_true",
                   help="like PaddleX: score and label only the last window's rows")
    s.add_argument("--max-gap", type=gap_factor, default=2.5, metavar="K",
                   help="reject steps over K x the median step (1.5 = strictly regular; 0 = off)")
    s.add_argument("--log-level", default="warning")
    s.set_defaults(fn=cmd_predict)

    s = sub.add_parser("fit-policy", help="fit a model's default policy on normal recordings",
                       description="Replays each normal recording as a deployed stream (learn on "
                       "its first --learn rows, then run to its end) and finds the smallest "
                       "threshold margin that keeps false alerts within budget; the other "
                       "settings are given with --set. With --write the policy goes into the "
                       "model's metadata and every command then uses it by default.")
    s.add_argument("model")
    s.add_argument("--data", nargs="+", required=True, help="normal recordings (CSV)")
    s.add_argument("--learn", type=int, default=400, help="learning period in rows")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a detection setting of the policy (JSON value), repeatable")
    s.add_argument("--alerts-per-day", type=float, default=1.0,
                   help="false alerts allowed per day of normal running (at least 1 in all)")
    s.add_argument("--open-share", type=float, default=0.01,
                   help="share of normal rows an alert may be open on")
    s.add_argument("--starts", nargs="+", default=[],
                   help="normal recordings that begin with a fresh start (the start rule)")
    s.add_argument("--start-hours", type=float, default=8.0,
                   help="hours after the learning period a start rule looks at")
    s.add_argument("--start-quantile", type=float, default=0.95,
                   help="share of the starts that must stay quiet at the start margin")
    s.add_argument("--safety", type=float, default=1.1,
                   help="factor on the start margin (rounded up onto the 1.1x grid)")
    s.add_argument("--reason", default="", help="why these settings (stored with the policy)")
    s.add_argument("--write", action="store_true", help="store the policy in the metadata")
    s.add_argument("--log-level", default="warning")
    s.set_defaults(fn=cmd_fit_policy)

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
    s.add_argument("--max-gap", type=gap_factor, default=2.5, metavar="K")
    s.add_argument("--visualize", action="store_true",
                   help="PaddleX endpoint returns a PNG too (needs matplotlib)")
    s.add_argument("--log-level", default="info")
    s.set_defaults(fn=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
