"""The HTTP API under load and under big bodies, against a real `tsad-agent serve`
process on loopback.

load    CLIENTS threads start together (a barrier) and each sends REQUESTS requests,
        one connection each, alternating a sample on its own stream and /healthz.
        Reports status codes, connection errors by kind (resets, refusals, timeouts),
        and latency percentiles (connect to last byte).
memory  BODIES clients send an 8 MiB body at once and the server's peak RSS (VmHWM)
        is reported.  --body anomaly: {"values": one long list of numbers} to
        /anomaly (a server that reads and parses it refuses it with 422); --body csv:
        the PaddleX endpoint's {"csv": base64} of a regular SKAB-style CSV of ~6 MiB
        (~75k rows), labelled in full.

    python benchmarks/bench_http.py load [--clients 200] [--requests 5]
    python benchmarks/bench_http.py memory [--bodies 16] [--body anomaly|csv]
    --repo DIR runs the server from another checkout (a before/after comparison).
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "models_onnx/DLinear_ad.onnx"
BODY_BYTES = 8 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(repo: Path, port: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "agent.cli", "serve", "--model", MODEL,
                          "--port", str(port), "--log-level", "error"], cwd=repo)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p
        except OSError:
            time.sleep(0.2)
    p.kill()
    raise SystemExit("server did not start")


def vm_kb(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def request(port: int, method: str, path: str, body: bytes | None, timeout: float = 120):
    """(status or error kind, seconds, Retry-After header)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body,
                     headers={"Content-Type": "application/json"} if body else {})
        r = conn.getresponse()
        r.read()
        return r.status, time.perf_counter() - t0, r.getheader("Retry-After")
    except (ConnectionResetError, BrokenPipeError) as e:   # RemoteDisconnected included
        return f"reset:{type(e).__name__}", time.perf_counter() - t0, None
    except ConnectionRefusedError:
        return "refused", time.perf_counter() - t0, None
    except TimeoutError:
        return "timeout", time.perf_counter() - t0, None
    finally:
        conn.close()


def run_load(port: int, clients: int, requests: int) -> dict:
    """Every client's requests; the tally and latency percentiles (ms)."""
    barrier = threading.Barrier(clients)
    out: list[tuple] = []
    lock = threading.Lock()
    sample = json.dumps([1.0] * 8)

    def client(i: int) -> None:
        barrier.wait()
        mine = []
        for k in range(requests):
            if k % 2 == 0:
                body = f'{{"stream": "c{i}", "values": {sample}}}'.encode()
                mine.append(request(port, "POST", "/anomaly", body))
            else:
                mine.append(request(port, "GET", "/healthz", None))
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(s for _, s, _ in out)
    q = statistics.quantiles(lat, n=100)
    return {"requests": len(out), "codes": dict(Counter(str(c) for c, _, _ in out)),
            "503_without_retry_after": sum(1 for c, _, h in out if c == 503 and not h),
            "p50_ms": round(q[49] * 1e3, 1), "p99_ms": round(q[98] * 1e3, 1),
            "max_ms": round(lat[-1] * 1e3, 1), "wall_s": round(wall, 2)}


def csv_body(limit: int) -> bytes:
    """{"csv": base64 CSV} just under `limit` bytes: SKAB demo rows, repeated, 1 s apart."""
    lines = (REPO / "agent/demo_data/skab_valve1_1.csv").read_text().splitlines()
    rows = [line.split(";", 1)[1] for line in lines[1:]]
    want = (limit - 64) * 3 // 4
    out, size, t0 = [lines[0]], len(lines[0]) + 1, 1.7e9
    while True:
        line = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t0 + len(out))) + ";" \
            + rows[len(out) % len(rows)]
        if size + len(line) + 1 > want:
            break
        out.append(line)
        size += len(line) + 1
    return json.dumps({"csv": base64.b64encode("\n".join(out).encode()).decode()}).encode()


def run_memory(port: int, pid: int, bodies: int, kind: str) -> dict:
    if kind == "csv":
        path, body = "/time-series-anomaly-detection", csv_body(BODY_BYTES)
    else:
        n = (BODY_BYTES - 64) // len("1.234567,")   # just under the 8 MiB limit
        path, body = "/anomaly", ('{"values": [' + ",".join(["1.234567"] * n) + "]}").encode()
    before = vm_kb(pid, "VmHWM")
    barrier = threading.Barrier(bodies)
    codes: list = []

    def client() -> None:
        barrier.wait()
        codes.append(request(port, "POST", path, body, timeout=600)[0])

    threads = [threading.Thread(target=client) for _ in range(bodies)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"bodies": bodies, "path": path, "body_mib": round(len(body) / 2**20, 2),
            "codes": dict(Counter(str(c) for c in codes)),
            "peak_rss_idle_mib": round(before / 1024, 1),
            "peak_rss_mib": round(vm_kb(pid, "VmHWM") / 1024, 1),
            "wall_s": round(time.perf_counter() - t0, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["load", "memory"])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--bodies", type=int, default=16)
    ap.add_argument("--body", choices=["anomaly", "csv"], default="csv")
    ap.add_argument("--repo", type=Path, default=REPO)
    a = ap.parse_args()
    port = free_port()
    srv = start_server(a.repo.resolve(), port)
    try:
        if a.what == "load":
            res = run_load(port, a.clients, a.requests)
        else:
            res = run_memory(port, srv.pid, a.bodies, a.body)
    finally:
        srv.terminate()
        srv.wait(30)
    print(json.dumps({"what": a.what, "repo": str(a.repo), **res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
