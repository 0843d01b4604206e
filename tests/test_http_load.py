"""The `serve` process and its connections: 200 concurrent clients against the real
process, full worker queues, large bodies on workers of their own, idle keep-alive
connections holding no worker, pipelining, the HTTP rules (413, 411, 404, 405,
garbage), SIGTERM.  Latency is printed (run with -s), never asserted; the speed
numbers come from benchmarks/bench_http.py.  Slow clients and the request deadline:
test_http_api."""
from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from agent.cli import DEMO_CSV, main
from conftest import REPO, free_port, wait_port
from http_harness import MODEL, call, demo_b64, demo_rows, error_of, read_all, start, stop

CLIENTS, REQUESTS = 200, 3
KEY = "s3cret-key-for-tests"

pytestmark = pytest.mark.skipif(not MODEL.exists(), reason=f"shipped model {MODEL} not built")


def one_request(port: int, method: str, path: str, body: bytes | None = None):
    """(status or the connection error's name, seconds, Retry-After)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body)
        r = conn.getresponse()
        r.read()
        return r.status, time.perf_counter() - t0, r.getheader("Retry-After")
    except OSError as e:        # resets, refusals, timeouts: each one is a failure here
        return type(e).__name__, time.perf_counter() - t0, None
    finally:
        conn.close()


def test_200_concurrent_clients_are_all_answered_without_a_reset():
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "agent.cli", "serve", "--model", str(MODEL),
                          "--port", str(port), "--log-level", "warning"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results: list[tuple] = []
    lock = threading.Lock()
    barrier = threading.Barrier(CLIENTS)

    def client(i: int) -> None:
        sample = json.dumps({"stream": f"c{i}", "values": [1.0] * 8}).encode()
        barrier.wait()
        mine = [one_request(port, "POST", "/anomaly", sample),
                one_request(port, "GET", "/healthz"),
                one_request(port, "POST", "/anomaly", sample)]
        with lock:
            results.extend(mine)

    try:
        wait_port(port, 60)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=30)
    codes = [c for c, _, _ in results]
    lat = statistics.quantiles([s for _, s, _ in results], n=100)
    print(f"\n{CLIENTS} clients x {REQUESTS} requests: p50 {lat[49] * 1e3:.1f} ms, "
          f"p99 {lat[98] * 1e3:.1f} ms, max {max(s for _, s, _ in results) * 1e3:.1f} ms")
    # the default queue (256) holds every waiting connection of 200 clients: no 503 either
    assert codes == [200] * (CLIENTS * REQUESTS), sorted(set(map(str, codes)))
    assert p.returncode == 0, out


# ---------------------------------------------------------------- in-process limits
@pytest.fixture(scope="module")
def server():
    """Model scaler and threshold (no calibration): windows without a stream are scored."""
    srv = start(calibrate=0)
    yield srv
    stop(srv)


def limited(**kw):
    return start(calibrate=0, **kw)


def wait_until(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def test_full_queue_answers_503_with_retry_after_and_no_reset():
    # no slow client can hold a small-request worker (that is the point): work does.
    # A burst of small PaddleX requests (a few hundred rows each, tens of ms of work)
    # on one worker with a queue of one: the rest are refused at once, unread, no reset
    srv = limited(threads=1, queue_size=1)
    port = srv.server_address[1]
    rows = DEMO_CSV.read_bytes().splitlines(keepends=True)[:300]
    body = json.dumps({"csv": base64.b64encode(b"".join(rows)).decode()}).encode()
    assert len(body) < 64 << 10
    request = (b"POST /time-series-anomaly-detection HTTP/1.1\r\nConnection: close\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body) + body)
    try:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(12)]
        for s in socks:
            s.sendall(request)
        answers = [read_all(s).partition(b"\r\n\r\n") for s in socks]
        for s in socks:
            s.close()
        codes = [int(head.split()[1]) for head, _, _ in answers]
        busy = [(head, rest) for head, _, rest in answers if head.startswith(b"HTTP/1.1 503 ")]
        assert set(codes) == {200, 503} and codes[0] == 200, codes
        for head, rest in busy:
            assert b"Retry-After: 1" in head and "retry" in json.loads(rest)["errorMsg"]
        assert srv.stats["busy_queue"] == len(busy)
    finally:
        stop(srv)


def test_an_idle_kept_alive_connection_holds_no_worker():
    srv = limited(threads=1, idle_s=60.0)
    port = srv.server_address[1]
    try:
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        kept.request("GET", "/healthz")
        r = kept.getresponse()
        r.read()
        assert r.getheader("Connection") is None
        sock = kept.sock
        # the only worker is free for others while `kept` idles (for up to 60 s)
        other = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        other.request("GET", "/healthz")
        assert other.getresponse().status == 200
        other.close()
        # and `kept` is still open for its next request
        kept.request("GET", "/healthz")
        assert kept.getresponse().status == 200 and kept.sock is sock
        kept.close()
    finally:
        stop(srv)


def test_pipelined_requests_are_all_answered(server):
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\n\r\n" * 3 + b"GET /healthz HTTP/1.1\r\n"
                  b"Connection: close\r\n\r\n")
        data = read_all(s)
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 4


def test_large_bodies_have_workers_of_their_own():
    srv = limited(large_threads=1, large_queue=1, deadline_s=5.0, idle_s=0.2)
    port = srv.server_address[1]
    big = 2 << 20
    head = b"POST /time-series-anomaly-detection HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % big
    try:
        # a large body that is slow to come holds the one large-body worker
        holder = socket.create_connection(("127.0.0.1", port), timeout=30)
        holder.sendall(head + b"{")
        time.sleep(0.3)
        wait_until(lambda: srv.waiting == 0)
        # the next one waits in the large queue, the one after is refused at once
        queued = socket.create_connection(("127.0.0.1", port), timeout=30)
        queued.sendall(head + b"{")
        wait_until(lambda: srv.waiting == 1)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(head + b" " * 65536)
            got_head, _, rest = read_all(s).partition(b"\r\n\r\n")
        assert got_head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in got_head
        assert "retry" in json.loads(rest)["errorMsg"]
        # small requests are served all the while
        small = json.dumps({"values": [1.0] * 8}).encode()
        for _ in range(3):
            assert one_request(port, "POST", "/anomaly", small)[0] == 200
        # the holder's body, once complete, is read and answered (not JSON: 400), and the
        # queued one gets the worker
        holder.sendall(b" " * (big - 1))
        assert read_all(holder).startswith(b"HTTP/1.1 400 ")
        queued.sendall(b" " * (big - 1))
        assert read_all(queued).startswith(b"HTTP/1.1 400 ")
        holder.close()
        queued.close()
        assert srv.stats["busy_large_queue"] == 1 and srv.stats["busy_queue"] == 0
    finally:
        stop(srv)


def test_request_counts_survive_a_crowd_in_metrics():
    srv = limited(threads=2)
    port = srv.server_address[1]
    try:
        threads = [threading.Thread(target=one_request, args=(port, "GET", "/healthz"))
                   for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        code, _, _ = one_request(port, "GET", "/healthz")
        assert code == 200

        def lines() -> list[str]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            conn.close()
            return text.splitlines()

        # a request is counted once its response is written, so the client can read the
        # last one and ask /metrics (the other worker) before its count lands: wait for it
        want = 'tsad_http_requests_total{code="200",path="/healthz"} 51.0'
        wait_until(lambda: want in lines())
        assert want in lines()
    finally:
        stop(srv)


# ---------------------------------------------------------------- HTTP rules
def test_oversized_body_is_413_without_reading_it(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.putrequest("POST", "/time-series-anomaly-detection")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(9 << 20))
    conn.endheaders(b"{\"csv\": \"")
    r = conn.getresponse()
    assert r.status == 413 and r.getheader("Connection") == "close"
    msg = json.loads(r.read())["errorMsg"]
    assert msg.endswith("over the 8388608-byte limit of /time-series-anomaly-detection")
    conn.close()
    # /anomaly takes one window at most: 64 KiB is plenty, more is refused unread
    code, headers, body = call(server, "POST", "/anomaly", b"[" + b" " * (64 << 10) + b"]")
    assert code == 413 and headers["Connection"] == "close"
    assert "over the 65536-byte limit of /anomaly" in json.loads(body)["errorMsg"]


def test_missing_length_unknown_path_wrong_method(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.putrequest("POST", "/anomaly")
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 411
    conn.close()
    assert "no such path" in error_of(call(server, "GET", "/nope"), 404)
    code, headers, _ = call(server, "GET", "/anomaly")
    assert code == 405 and headers["Allow"] == "POST"
    assert call(server, "DELETE", "/healthz")[0] == 405
    code, _, body = call(server, "HEAD", "/healthz")
    assert code == 200 and body == b""


def test_keep_alive_serves_several_requests_on_one_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    for _ in range(3):
        conn.request("GET", "/healthz")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    conn.close()


def test_a_head_over_16_kib_is_431(server):
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\n" + b"X-Pad: " + b"a" * (17 << 10) + b"\r\n\r\n")
        head, _, body = read_all(s).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ") and json.loads(body)["errorCode"] == 431
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.request("GET", "/metrics")
    metrics = conn.getresponse().read().decode()
    conn.close()
    assert 'tsad_http_requests_total{code="431",path="other"} 1.0' in metrics.splitlines()


def test_expect_100_continue(server):
    body = json.dumps({"values": [1.0] * 8}).encode()
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as s:
        s.sendall(b"POST /anomaly HTTP/1.1\r\nExpect: 100-continue\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        assert s.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n")
        s.sendall(body)
        head, _, rest = read_all(s).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and json.loads(rest)["status"] == "warming_up"


# ---------------------------------------------------------------- concurrency
def test_concurrent_requests(server):
    win = {"values": demo_rows(64).tolist()}
    alone = json.loads(call(server, "POST", "/anomaly", win)[2])
    want_csv = json.loads(call(server, "POST", "/time-series-anomaly-detection",
                               {"csv": demo_b64()})[2])["result"]["csv"]

    def one(i):
        if i % 8 == 0:
            code, _, body = call(server, "POST", "/time-series-anomaly-detection", {"csv": demo_b64()})
            return code, json.loads(body)["result"]["csv"] == want_csv
        code, _, body = call(server, "POST", "/anomaly", win)
        return code, json.loads(body)["score"] == alone["score"]

    with ThreadPoolExecutor(12) as ex:
        results = list(ex.map(one, range(48)))
    assert results == [(200, True)] * 48


def test_garbage_request_line_gets_a_json_400(server):
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as s:
        s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") or head.startswith(b"HTTP/1.0 400"), head
    assert json.loads(body)["errorCode"] == 400


# ---------------------------------------------------------------- the CLI daemon
def test_serve_command_runs_and_stops_on_sigterm(tmp_path):
    port = free_port()
    env = {**os.environ, "TSAD_KEY": KEY}
    p = subprocess.Popen([sys.executable, "-m", "agent.cli", "serve", "--model", str(MODEL),
                          "--port", str(port), "--api-key-env", "TSAD_KEY"], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_port(port, 60)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/metrics")
        assert conn.getresponse().status == 401
        conn.close()
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=30)
    assert p.returncode == 0, out
    assert f"http://127.0.0.1:{port}" in out and "API key required" in out


def test_serve_command_refuses_an_unset_key(capsys):
    assert main(["serve", "--model", str(MODEL), "--api-key-env", "TSAD_SURELY_UNSET_VAR"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: API key variable TSAD_SURELY_UNSET_VAR is not set or empty"


def _serve_error(capsys, *args: str) -> str:
    assert main(["serve", "--model", str(MODEL), "--log-level", "warning", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.strip()


def test_serve_command_that_cannot_listen_says_why_in_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert _serve_error(capsys, "--port", str(port)) == \
            f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert _serve_error(capsys, "--port", "99999") == \
        "error: cannot listen on 127.0.0.1:99999: port must be 0-65535"
    assert _serve_error(capsys, "--host", "256.1.1.1", "--port", "0").startswith(
        "error: cannot listen on 256.1.1.1:0: ")


def test_serve_listens_on_ipv6_loopback():
    from agent.http.server import make_server
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 here")
    srv = make_server(str(MODEL), host="::1", port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert srv.url.startswith("http://[::1]:")
        conn = http.client.HTTPConnection("::1", srv.server_address[1], timeout=30)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("n", ["3", "-5"])
def test_serve_refuses_a_calibration_predict_refuses(capsys, n):
    assert _serve_error(capsys, "--port", "0", "--calibrate", n) == \
        f"error: --calibrate {n}: 0 (the model's scaler and threshold) or at least 10 rows"


def test_serve_refuses_a_key_no_client_can_send(capsys, monkeypatch):
    monkeypatch.setenv("TSAD_TEST_KEY", "clé-secrète")
    assert _serve_error(capsys, "--port", "0", "--api-key-env", "TSAD_TEST_KEY") == \
        "error: API key from TSAD_TEST_KEY must be printable ASCII (letters, digits, punctuation)"


# ---------------------------------------------------------------- Content-Length, Expect
SAMPLE = json.dumps({"values": [1.0] * 8}).encode()
N = len(SAMPLE)


def _send(port: int, data: bytes) -> tuple[bytes, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        head, _, body = read_all(s).partition(b"\r\n\r\n")
    return head, body


def _post(*lengths: str) -> bytes:
    return (b"POST /anomaly HTTP/1.1\r\nConnection: close\r\n"
            + b"".join(b"Content-Length: %s\r\n" % v.encode() for v in lengths) + b"\r\n" + SAMPLE)


@pytest.mark.parametrize("lengths", [
    [f"+{N}"], [f"{N // 10}_{N % 10}"], ["-1"], [""], [f"{N}x"], ["1" * 19],
    [str(N), str(N + 1)], [f"{N}, {N + 1}"]])
def test_content_length_is_digits_only_and_one_value(server, lengths):
    head, body = _send(server.server_address[1], _post(*lengths))
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert "Content-Length" in json.loads(body)["errorMsg"]


@pytest.mark.parametrize("lengths", [
    [str(N), str(N)], [f"{N}, {N}"], [f"{N:013d}"]])
def test_equal_content_lengths_count_once(server, lengths):
    head, body = _send(server.server_address[1], _post(*lengths))
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert json.loads(body)["status"] == "warming_up"


def test_bodies_awaited_hold_no_worker_whatever_their_length_form_or_expect():
    """A small body that never comes is awaited by the watcher, not a worker: with a
    length in any valid form, and after `Expect: 100-continue` (the watcher says
    "100 Continue" itself)."""
    srv = limited(threads=1, deadline_s=4.0)
    port = srv.server_address[1]
    heads = [b"POST /anomaly HTTP/1.1\r\nContent-Length: %013d\r\n\r\n" % N] * 2 + \
        [b"POST /anomaly HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % N] * 2
    try:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in heads]
        for s, h in zip(socks, heads):
            s.sendall(h)
        for s in socks[2:]:
            assert s.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        t0 = time.monotonic()
        assert one_request(port, "GET", "/healthz")[0] == 200
        assert time.monotonic() - t0 < 1.0
        # and the body, once sent, is answered (no second "100 Continue")
        socks[3].sendall(SAMPLE)
        socks[3].settimeout(10)
        head = socks[3].recv(4096)
        assert head.startswith(b"HTTP/1.1 200 "), head
        for s in socks:
            s.close()
    finally:
        stop(srv)


def test_a_request_line_without_a_version_gets_a_status_line(server):
    head, body = _send(server.server_address[1], b"GET /healthz\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert "no HTTP version" in json.loads(body)["errorMsg"]
