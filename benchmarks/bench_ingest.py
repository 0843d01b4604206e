"""Ingestion cost: the agent against a bare paho subscriber, fed by the same publisher.

For each case (streams x rate), in one run and one after the other on the same broker:
  (a) a bare paho subscriber on `plant/+/sensors` whose callback decodes the CSV line
      to floats and throws them away (the floor any MQTT consumer in Python pays);
  (b) the agent (`tsad-agent run`, its own process) with an MQTT source on the same
      filter, the model's policy, per-stream learning, the MQTT sink on.
The same publisher sends the same messages to both.  Reported per consumer: CPU µs
per message (utime + stime from /proc over the publishing window and the catch-up),
CPU % of a core, messages lost (the agent's samples_in against what was sent), RSS;
the ratio agent / bare; and, for the agent, the part of its CPU per message spent in its
main thread (the pipeline: decoding, the engine, the sinks; the rest is paho's network
threads, which the bare subscriber has too), and the samples a stream got per engine step
(health `samples_in` / `stream_steps`: what spreads each stream's fixed cost per step;
"-" for code older than that counter), and the alerts it opened (0: the streams were as
normal as meant; soak.SAMPLE_INTERVAL_S says why samples are stamped a second apart).
Consumers run one at a time so they do not compete.
With several cases, each agent's CPU per message is also given over its own in the first
case of the same repeat (500x10 over 50x100: the same messages/s over ten times the
streams, the agent against itself).
Figures are taken after a warm-up (by default the model policy's learning period at the
case's rate, + 5 s): the steady state a daemon spends its life in.

    python benchmarks/bench_ingest.py                      # 50x100 and 500x10, 1 sample/msg
    python benchmarks/bench_ingest.py --cases 50x100 --duration 60 --batch 10
    python benchmarks/bench_ingest.py --cases 500x10 --batch-wait auto,0,0.1   # side by side
    python benchmarks/bench_ingest.py --repo /work/main,. --repeat 2   # old and new code
    python benchmarks/bench_ingest.py --read-bytes 0,16384 --bare-buffered  # paho's reads, blocks

On a loaded machine the publisher can fall behind; it then pauses while MAX_UNACKED
messages wait for the broker (QoS 1 ids wrap at 65535, and paho would overwrite the
oldest), and says so in the row, rather than losing messages itself.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import product
from pathlib import Path

import paho.mqtt.client as mqtt

import local_broker  # beside this script
from side_by_side import checkouts  # beside this script
from soak import (CLK_TCK, SAMPLE_INTERVAL_S, HealthWatch, Sampler, normal_rows,  # beside this script
                  proc_stats, row_at)

REPO = Path(__file__).resolve().parents[1]
# QoS 1 message ids wrap at 65535: more unacknowledged than that and paho overwrites them
MAX_UNACKED = 30000

BARE = r"""
import sys, threading, paho.mqtt.client as mqtt
port, expected, repo = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if repo:    # the agent's client class: paho reading the socket in blocks
    sys.path.insert(0, repo)
    from agent.mqtt_client import BufferedClient as Client
else:
    Client = mqtt.Client
n = 0
done = threading.Event()
def on_message(c, u, m):
    global n
    text = m.payload.decode()
    for line in text.splitlines():
        [float(v) for v in line.split(",")]
    n += 1
    if n >= expected:
        done.set()
c = Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bare-sub")
c.on_connect = lambda c, u, f, rc, p: c.subscribe("plant/+/sensors", qos=%d)
c.on_subscribe = lambda *a: print("ready", flush=True)
c.on_message = on_message
c.connect("127.0.0.1", port)
c.loop_start()
done.wait(%d)
print(n, flush=True)
"""


class Publisher:
    """N streams x R Hz of normal rows, `batch` CSV lines per message, paced in real time."""

    def __init__(self, port: int, channels, mean, std, qos: int):
        rows = normal_rows(channels, mean, std, 20000, 0)
        self.text = [",".join(f"{v:.6g}" for v in r) for r in rows]
        self.qos = qos
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-pub")
        self.c.max_queued_messages_set(0)
        # unlimited in flight: with paho's default of 20 a loaded machine backs the queue
        # up past 65535 messages, where QoS 1 message ids wrap and collide
        self.c.max_inflight_messages_set(0)
        # ... so this publisher must never have that many unacknowledged itself: it pauses
        # (a late tick) while MAX_UNACKED wait for the broker
        self.acked = 0
        self.c.on_publish = self._on_publish
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.acked += 1     # one writer: paho's network thread

    def run(self, streams: int, rate: float, batch: int, duration: float,
            warmup: float = 0.0, on_mark=None) -> dict:
        """Publish for warmup + duration seconds; `on_mark()` is called when the warm-up
        ends, and the counts returned are those after it."""
        sids = [f"s{i:03d}" for i in range(streams)]
        n_rows = len(self.text)
        tick = batch / rate
        n_warm = int(warmup / tick)
        n_ticks = n_warm + int(duration / tick)
        t_start = time.time()
        t0 = time.monotonic()
        msgs = late = stalls = 0
        published = self.acked
        t_mark = t0
        for k in range(n_ticks):
            if k == n_warm:
                if on_mark is not None:
                    on_mark()
                msgs, t_mark = 0, time.monotonic()
            # every stream sends the same rows (row_at), so a tick's payload is built once
            payload = "\n".join(f"{t_start + (k * batch + j) * SAMPLE_INTERVAL_S:.3f},"
                                f"{self.text[row_at(k * batch + j, n_rows)]}"
                                for j in range(batch))
            for sid in sids:
                self.c.publish(f"plant/{sid}/sensors", payload, qos=self.qos)
                msgs += 1
            published += streams
            if self.qos and published - self.acked > MAX_UNACKED:
                stalls += 1
                while published - self.acked > MAX_UNACKED // 2:
                    time.sleep(0.001)
            lag = t0 + (k + 1) * tick - time.monotonic()
            if lag > 0:
                time.sleep(lag)
            else:
                late += 1
        return {"messages": msgs, "samples": msgs * batch,
                "publish_s": time.monotonic() - t_mark, "late_ticks": late, "stalls": stalls,
                "total_messages": n_ticks * streams}

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def cpu_s(pid: int) -> float:
    return proc_stats(pid)[1] / CLK_TCK


def main_thread_cpu_s(pid: int) -> float:
    """CPU seconds of the process's main thread: the agent's pipeline (decoding, the engine,
    the sinks), apart from the paho network threads."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def bare_case(port: int, pub: Publisher, case: tuple, qos: int, buffered_from: str = "") -> dict:
    """The bare subscriber; with `buffered_from` (a checkout), on that agent's MQTT client
    class instead of paho's (what the agent's socket reads alone save)."""
    streams, rate, batch, duration, warmup = case
    expected = (int(warmup / (batch / rate)) + int(duration / (batch / rate))) * streams
    p = subprocess.Popen([sys.executable, "-c", BARE % (qos, int(warmup + duration) + 120),
                          str(port), str(expected), buffered_from], stdout=subprocess.PIPE,
                         text=True)
    mark = {}
    try:
        assert p.stdout.readline().strip() == "ready", "bare subscriber did not subscribe"
        sampler = Sampler(p.pid, 1.0)
        sampler.start()
        sent = pub.run(streams, rate, batch, duration, warmup,
                       lambda: mark.setdefault("cpu", cpu_s(p.pid)))
        while True:     # CPU is read while it lives, until it prints its count
            c1 = cpu_s(p.pid)
            if _ready(p):
                got = int(p.stdout.readline())
                break
            time.sleep(0.2)
    finally:
        p.kill()
        p.wait()
    sampler.stop.set()
    return {**sent, "received": got - (sent["total_messages"] - sent["messages"]),
            "cpu_s": c1 - mark["cpu"], "rss_mb": max(r for _, r, _ in sampler.rows) / 1024}


def _ready(p: subprocess.Popen) -> bool:
    import select
    return bool(select.select([p.stdout], [], [], 0)[0])


def agent_case(port: int, pub: Publisher, case: tuple, qos: int, model: str,
               work: Path, batch_wait: str = "auto", repo: Path = REPO,
               run_no: int = 0, read_bytes: int | None = None) -> dict:
    import yaml
    streams, rate, batch, duration, warmup = case
    # one node per agent run: a run must not read the retained health of the one before
    node = f"bench{streams}-{batch_wait}-{run_no}"
    cfg = {
        "node": node, "log_level": "warning", "state_dir": str(work / f"state-{node}"),
        "model": {"path": model,
                  "batch_wait_s": batch_wait if batch_wait == "auto" else float(batch_wait)},
        "streams": [{"id": "plant", "source": {"type": "mqtt", "topic": "plant/+/sensors",
                                               "stream_from_topic": 1, "protocol": "csv",
                                               "qos": qos, "max_streams": max(streams, 1)}}],
        "mqtt": {"host": "127.0.0.1", "port": port, "health_interval_s": 2.0},
        "sinks": {"console": {"enabled": False}},
    }
    if read_bytes is not None:    # only when given: code older than the key refuses it
        cfg["mqtt"]["read_bytes"] = read_bytes
    conf = work / f"{node}.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    log_path = work / f"{node}.log"
    with open(log_path, "wb") as log:
        agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config",
                                  str(conf)], cwd=repo, stdout=log, stderr=subprocess.STDOUT)
    health = HealthWatch(port, node)
    try:
        deadline = time.monotonic() + 60
        while not (health.last and health.last["sources"]["plant"]["connected"]):
            if agent.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"agent did not come up:\n{log_path.read_text()}")
            time.sleep(0.1)
        mark = {}
        sampler = Sampler(agent.pid, 5.0)
        sampler.start()

        def on_mark():
            mark["cpu"], mark["rss"] = cpu_s(agent.pid), proc_stats(agent.pid)[0]
            mark["main"] = main_thread_cpu_s(agent.pid)
            h0 = health.last or {}
            mark["in"], mark["ss"] = h0.get("samples_in", 0), h0.get("stream_steps", 0)
        sent = pub.run(streams, rate, batch, duration, warmup, on_mark)
        total = sent["total_messages"] * batch
        rss_max = mark["rss"]
        deadline = time.monotonic() + 120
        while (health.last or {}).get("samples_in", 0) < total and time.monotonic() < deadline:
            rss_max = max(rss_max, proc_stats(agent.pid)[0])
            time.sleep(0.2)
        c1, rss = cpu_s(agent.pid), proc_stats(agent.pid)[0]
        main1 = main_thread_cpu_s(agent.pid)
        sampler.stop.set()
        time.sleep(2.5)          # one more health period for the final counters
        h = health.last or {}
    finally:
        health.close()
        agent.terminate()
        try:
            agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()
    text = log_path.read_text(errors="replace")
    if "Traceback" in text:
        print(f"agent log has a traceback:\n{text[-3000:]}", file=sys.stderr)
    return {**sent, "received": (h.get("samples_in", 0) - (total - sent["samples"])) // batch,
            "cpu_s": c1 - mark["cpu"], "main_cpu_s": main1 - mark["main"],
            "rss_mb": rss / 1024, "rss_max_mb": rss_max / 1024,
            "timeline": [(round(t), round(r / 1024, 1), round(c, 1)) for t, r, c in sampler.rows],
            "windows": h.get("windows_inferred"), "malformed": h.get("malformed"),
            # alerts opened over the whole run: 0 says the streams were as normal as meant
            "alerts_new": (h.get("alerts") or {}).get("new", 0),
            # samples a stream got per engine step over the measured part (health counters,
            # read every 2 s): each stream's fixed cost per step is spread over these
            "per_step": (h.get("samples_in", 0) - mark["in"])
            / max(h["stream_steps"] - mark["ss"], 1) if "stream_steps" in h else None}


def _per_message(r: dict) -> dict:
    r["us_per_msg"] = r["cpu_s"] * 1e6 / r["messages"]
    if "main_cpu_s" in r:
        r["pipeline_us_per_msg"] = r["main_cpu_s"] * 1e6 / r["messages"]
    r["core_percent"] = 100 * r["cpu_s"] / r["publish_s"]
    r["lost"] = r["messages"] - r["received"]
    return r


def _print_row(spec: str, name: str, r: dict, ratio: float | None = None) -> None:
    print(f"{spec:>9} {name:>14} {r['messages']:8d} {r['lost']:5d} {r['us_per_msg']:7.1f} "
          f"{r['core_percent']:6.1f} {r['rss_mb']:7.1f} " + (f"{ratio:6.2f}" if ratio else "      ")
          + (f" {r['pipeline_us_per_msg']:11.1f}" if "pipeline_us_per_msg" in r else "")
          + ((f" {r['per_step']:9.1f}" if r.get("per_step") is not None else f" {'-':>9}")
             + f" {r['alerts_new']:6d}" if "alerts_new" in r else "")
          + (f"  (publisher paused {r['stalls']}x)" if r["stalls"] else ""), flush=True)


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", default="50x100,500x10", help="streams x Hz, comma separated")
    ap.add_argument("--batch", type=int, default=1, help="samples per message")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of publishing per run")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds published before measuring (default: the learning period "
                         "at the case's rate + 5 s)")
    ap.add_argument("--qos", type=int, default=1, choices=(0, 1, 2))
    ap.add_argument("--model", default=str(REPO / "models_onnx" / "DLinear_ad.onnx"))
    ap.add_argument("--batch-wait", default="auto",
                    help="model.batch_wait_s for the agent; several, comma separated, run "
                         "side by side against the same bare run (e.g. auto,0)")
    ap.add_argument("--repo", default=str(REPO),
                    help="the agent's checkout; several, comma separated, run side by side "
                         "against the same bare run (e.g. /work/main,.: old and new code)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each case this many times (bare, then every agent, in turn)")
    ap.add_argument("--read-bytes", default="default",
                    help="mqtt.read_bytes for the agent ('default': the agent's own, 16384 "
                         "since 2026-12-07); several, comma separated, run side by side "
                         "against the same bare run (e.g. 0,16384)")
    ap.add_argument("--bare-buffered", action="store_true",
                    help="also run the bare subscriber on the (last) agent checkout's MQTT "
                         "client class, which reads the socket in blocks; its ratio is to "
                         "the plain bare subscriber")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--timeline", action="store_true",
                    help="print the agent's (s, RSS MB, CPU %%) every 5 s of its run")
    return ap.parse_args()


def main() -> int:
    a = _args()

    meta = json.loads(Path(a.model + ".json").read_text())
    # measured after every stream has learned its baseline: the steady state a daemon lives in
    learning = (meta.get("policy") or {}).get("settings", {}).get("calibration", {}).get(
        "samples", 0)
    work = Path(tempfile.mkdtemp(prefix="tsad-ingest-"))
    broker, port = local_broker.start(
        work, "persistence false\nmax_queued_messages 0\nmax_queued_bytes 0\n")
    pub = Publisher(port, meta["channels"], meta["scaler"]["mean"], meta["scaler"]["std"], a.qos)
    results = []
    try:
        print(f"bench_ingest: {Path(a.model).stem}, {a.batch} sample(s)/message, qos {a.qos}, "
              f"{a.duration:g} s per run, {os.cpu_count()} cores")
        print(f"{'case':>9} {'consumer':>14} {'msgs':>8} {'lost':>5} {'µs/msg':>7} "
              f"{'% core':>6} {'RSS MB':>7} {'ratio':>6} {'pipeline µs':>11} {'per step':>9} "
              f"{'alerts':>6}")
        repos = checkouts(a)
        read_sizes = [None if v == "default" else int(v) for v in a.read_bytes.split(",")]
        run_no = 0
        cases = a.cases.split(",")
        for i, spec in enumerate(cases * a.repeat):
            streams, rate = spec.split("x")
            warmup = a.warmup if a.warmup is not None else learning / float(rate) + 5.0
            case = (int(streams), float(rate), a.batch, a.duration, warmup)
            bare = _per_message(bare_case(port, pub, case, a.qos))
            _print_row(spec, "bare", bare)
            buf = None
            if a.bare_buffered:
                buf = _per_message(bare_case(port, pub, case, a.qos, str(repos[-1])))
                _print_row(spec, "bare, buffered", buf, buf["us_per_msg"] / bare["us_per_msg"])
            for wait, repo, rb in product(a.batch_wait.split(","), repos, read_sizes):
                run_no += 1
                agent = _per_message(agent_case(port, pub, case, a.qos, a.model, work,
                                                wait, repo, run_no, rb))
                ratio = agent["us_per_msg"] / bare["us_per_msg"]
                name = (f"{repo.name}/" if len(repos) > 1 else "agent/") + wait \
                    + (f"/r{'default' if rb is None else rb}" if len(read_sizes) > 1 else "")
                results.append({"case": spec, "batch": a.batch, "batch_wait": wait,
                                "repo": str(repo), "read_bytes": rb,
                                "repeat": i // len(cases), "bare": bare,
                                "bare_buffered": buf, "agent": agent, "ratio": ratio})
                _print_row(spec, name, agent, ratio)
                if a.timeline:
                    print("  agent timeline (s, RSS MB, CPU %):", agent["timeline"])
    finally:
        pub.close()
        broker.terminate()
        broker.wait(10)
    _print_against_first(results, cases)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["agent"]["lost"] == 0 and r["bare"]["lost"] == 0
                    and (r["bare_buffered"] or {}).get("lost", 0) == 0 for r in results) else 1


def _setup(r: dict) -> tuple:
    """One agent's code and settings: what a row is compared with itself by."""
    return r["repo"], r["batch_wait"], r["read_bytes"]


def _print_against_first(results: list[dict], cases: list[str]) -> None:
    """Each agent's CPU per message in every case over its own in the first case of the
    same repeat: "the same CPU per message at 500 streams as at 50" compares the agent
    with itself, while the ratio column divides by a bare subscriber whose own cost moves
    with the case too (7-21 % lower at 500x10 in most runs of docs/RESULTS.md)."""
    if len(cases) < 2:
        return
    first = {(_setup(r), r["repeat"]): r["agent"]["us_per_msg"]
             for r in results if r["case"] == cases[0]}
    rows = {}
    for r in results:
        base = first.get((_setup(r), r["repeat"]))
        if r["case"] != cases[0] and base:
            rows.setdefault((r["case"], _setup(r)), []).append(r["agent"]["us_per_msg"] / base)
    for (case, (repo, wait, rb)), vals in rows.items():
        print(f"agent ({Path(repo).name}/{wait}/r{rb}) CPU per message, {case} / {cases[0]}: "
              + ", ".join(f"{v:.2f}" for v in vals))


if __name__ == "__main__":
    sys.exit(main())
