"""The HTTP side of `tsad-agent serve` (standard library only).

POST /time-series-anomaly-detection  PaddleX serving contract: {"csv": base64 CSV} ->
                                     {"logId", "errorCode": 0, "errorMsg": "Success",
                                      "result": {"csv": base64 `timestamp,label`, "image"}};
                                     the labels are `agent.prediction.predict`'s, same settings.
POST /anomaly                        one sample (C numbers) into a stream, or one window
                                     (W x C) scored against a fitting baseline: `bodies`.
GET  /healthz, /metrics (Prometheus text 0.0.4), /openapi.json

Every error is {"logId", "errorCode": HTTP status, "errorMsg"}; no traceback ever
reaches a client.  With an API key (X-API-Key or Authorization: Bearer, compared in
constant time; the first non-empty one counts) everything but /healthz and
/openapi.json needs it: probes and API browsers carry no secrets.  Binds 127.0.0.1
unless told otherwise.

Load and memory (connections, deadlines, keep-alive, the worker pools: `pool`):
`threads` workers serve small requests, `queue_size` more wait; `large_threads`
workers serve requests with a body over 64 KiB (the PaddleX endpoint), `large_queue`
more wait; beyond, 503 + Retry-After.  A body is at most `max_body` (8 MiB) on the
PaddleX endpoint and `anomaly_body_limit` (64 KiB, or 64 bytes per number of a window
if more) on /anomaly, refused unread (413) when larger; a large body gets one second
more than the deadline per 256 KiB.  So at most `large_threads`
large bodies (2 x 8 MiB, plus their decoding and the prediction: about 100 MiB each
measured) are held at once, and every small one is at most 64 KiB.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

from .. import __version__
from ..config_base import ConfigError
from ..contract import learning_rows_problem
from ..detector import DetectorError
from .bodies import HttpError, handle_anomaly, handle_paddlex, json_body
from .openapi import PADDLEX_PATH, build_spec
from .prometheus import metrics_text
from .service import AnomalyService, InputError, NotJudgeable, TooManyStreams
from .pool import PooledServer
from .transport import CONTINUE, Conn, DeadlineReader, DeadlineWriter, content_length

log = logging.getLogger("tsad.http")
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7f)}

MAX_BODY = 8 << 20
MIN_BODY_RATE = 256 << 10      # bytes/s
ROUTES = {PADDLEX_PATH: "POST", "/anomaly": "POST", "/healthz": "GET", "/metrics": "GET",
          "/openapi.json": "GET"}
OPEN_PATHS = {"/healthz", "/openapi.json"}
LIMITS = {"threads": 4, "queue_size": 256, "large_threads": 2, "large_queue": 16,
          "deadline_s": 10.0, "idle_s": 5.0}


def anomaly_body_limit(svc: AnomalyService, max_body: int) -> int:
    """The largest /anomaly body worth reading: a window, generously formatted."""
    return min(max_body, max(64 << 10, 64 * svc.meta.window * svc.meta.n_channels))


class ApiError(RuntimeError):
    """The server cannot start (key not set, port taken, ...); one line."""


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------- HTTP
class ApiServer(PooledServer):
    def __init__(self, svc: AnomalyService, host: str, port: int, api_key: str | None = None,
                 max_body: int = MAX_BODY, **limits):
        lim = {**LIMITS, **limits}
        self.svc, self.api_key, self.max_body = svc, api_key, max_body
        self.limits = {PADDLEX_PATH: max_body, "/anomaly": anomaly_body_limit(svc, max_body)}
        self.requests: Counter = Counter()
        self._req_lock = threading.Lock()
        self.spec = json.dumps(build_spec(svc.meta, svc.detector.ep, self.limits, bool(api_key),
                                          svc.model_scaler_ok), indent=1).encode()
        # an IPv6 address listens on IPv6; a host name is looked up as IPv4
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler, lim["threads"], lim["queue_size"],
                         lim["large_threads"], lim["large_queue"], lim["deadline_s"],
                         lim["idle_s"])

    @property
    def url(self) -> str:
        return f"http://{host_port(*self.server_address[:2])}"

    def answered(self, code: int) -> None:
        self.count("other", code)      # the path was never read

    def count(self, path: str, code: int) -> None:
        with self._req_lock:
            self.requests[(path if path in ROUTES else "other", code)] += 1

    def metrics(self) -> str:
        with self._req_lock:
            requests = Counter(self.requests)
        return metrics_text(self.svc, requests, self.stats_now(), self.waiting)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"tsad-agent/{__version__}"
    sys_version = ""
    server: ApiServer

    # ------------------------------------------------------------ connection
    def setup(self) -> None:
        conn: Conn = self.request
        self.connection = conn.sock
        # the head is complete in conn.buf (the watcher waited for it); what is left
        # after this request stays there for the next one
        self.rfile = self._in = DeadlineReader(conn.sock, conn.buf,
                                               conn.deadline(self.server.deadline_s))
        self.wfile = self._out = DeadlineWriter(conn.sock, self._in.deadline)

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()

    def finish(self) -> None:
        pass     # the connection is the server's: kept alive, or closed with a linger

    def handle_one_request(self) -> None:
        """BaseHTTPRequestHandler's, on a head already complete (the watcher waited for
        it, under MAX_HEAD): a body cut off by the deadline gets 408."""
        self._responded, self._route = False, "other"
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if self.parse_request():
                self._dispatch()
        except TimeoutError:
            self.server.bump("timeout")
            self.close_connection = True
            if not self._responded:
                self._out.deadline = time.monotonic() + 1.0
                self._error(408, f"request not received within {self.server.deadline_s:g} s")
        except OSError:
            self.close_connection = True

    # ------------------------------------------------------------ plumbing
    def log_message(self, fmt, *args) -> None:
        # a request line is the client's text: escape control characters, so that it can
        # neither move the terminal's cursor nor start a journal entry of its own
        log.debug("%s %s", self.client_address[0], (fmt % args).translate(_CONTROL))

    def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self._responded = True
        # counted before the answer leaves: a client that reads /metrics after its answer
        # finds it counted (counted after the write, a quick client could get there first)
        self.server.count(self._route, code)
        self._out.deadline = time.monotonic() + self.server.deadline_s
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, doc: dict, extra: dict | None = None) -> None:
        # allow_nan=False: NaN and Infinity are not JSON; a bug answers 500, never them
        self._send(code, json.dumps(doc, allow_nan=False).encode(), "application/json", extra)

    def _error(self, code: int, msg: str, extra: dict | None = None) -> None:
        self._json(code, {"logId": str(uuid.uuid4()), "errorCode": code, "errorMsg": msg}, extra)

    def send_error(self, code, message=None, explain=None) -> None:
        # http.server's own errors (bad request line, header too long): JSON too, no HTML
        self.close_connection = True
        # an unparsable request line leaves the HTTP/0.9 default, which sends no status
        # line and no headers at all; nobody speaks 0.9 any more
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        self._error(code, message or self.responses.get(code, ("error",))[0])

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":
            # "GET /path" without a version: 0.9's answer is a bare body, no status line
            self.send_error(400, "request line has no HTTP version: send "
                                 "'METHOD PATH HTTP/1.1'")
            return False
        return True

    def handle_expect_100(self) -> bool:
        # not here, before the route, the key and the size are checked: `_body` sends it
        # when the body is wanted, unless the watcher already has (small bodies)
        return True

    # ------------------------------------------------------------ dispatch
    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        self._route = path
        try:
            self._handle(path)
        except HttpError as e:
            if e.reason:
                self.server.svc.metrics.bad(e.reason)
            self._error(e.status, e.msg, e.headers)
        except NotJudgeable as e:
            self.server.svc.metrics.bad("http_no_baseline")
            self._error(422, str(e))
        except InputError as e:
            self.server.svc.metrics.bad("http_input")
            self._error(422, str(e))
        except TooManyStreams as e:
            self.server.svc.metrics.bad("http_streams")
            self._error(429, str(e))
        except DetectorError as e:
            log.error("%s: %s", path, e)
            self._error(500, "inference failed; see the server log")
        except (TimeoutError, ConnectionError):     # the deadline, or the client went away
            raise
        except Exception:
            log.exception("unhandled error on %s %r", self.command, path)
            self.close_connection = True
            self._error(500, "internal error; see the server log")

    def _handle(self, path: str) -> None:
        srv, svc = self.server, self.server.svc
        try:        # on every path: a length read two ways is a smuggled request
            self._length = content_length(self.headers.get_all("Content-Length") or [])
        except ValueError as e:
            self.close_connection = True
            raise HttpError(400, str(e)) from None
        want = ROUTES.get(path)
        if want is None:
            self.close_connection = self.command not in ("GET", "HEAD")
            raise HttpError(404, f"no such path: {path}; see /openapi.json")
        if self.command != want and not (want == "GET" and self.command == "HEAD"):
            self.close_connection = True   # any body stays unread
            raise HttpError(405, f"{path} accepts {want} only", headers={"Allow": want})
        if srv.api_key and path not in OPEN_PATHS and not self._authorized(srv.api_key):
            self.close_connection = True
            raise HttpError(401, "missing or wrong API key (X-API-Key or Authorization: Bearer)",
                            headers={"WWW-Authenticate": "Bearer"})
        if self._length:
            self.close_connection = True    # a body no GET reads must not become a request
        if path == "/healthz":
            return self._json(200, {"status": "ok", "model": svc.meta.name, "ep": svc.detector.ep})
        if path == "/openapi.json":
            return self._send(200, srv.spec, "application/json")
        if path == "/metrics":
            return self._send(200, srv.metrics().encode(),
                              "text/plain; version=0.0.4; charset=utf-8")
        doc = json_body(self._body(srv.limits[path]))
        handler = handle_paddlex if path == PADDLEX_PATH else handle_anomaly
        self._json(200, handler(svc, doc))

    def _authorized(self, key: str) -> bool:
        # the first non-empty credential counts: an empty X-API-Key next to a Bearer
        # token is a client's template left blank, not an attempt with an empty key
        given = (self.headers.get("X-API-Key") or "").strip()
        if not given:
            auth = self.headers.get("Authorization") or ""
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        return bool(given) and hmac.compare_digest(given.encode(), key.encode())

    def _body(self, limit: int) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HttpError(411, "send a Content-Length; chunked bodies are not accepted")
        n = self._length
        if n is None:
            self.close_connection = True
            raise HttpError(411, "Content-Length required")
        if n > limit:
            self.close_connection = True   # the body is never read
            raise HttpError(413, f"body of {n} bytes is over the {limit}-byte limit of "
                                 f"{self._route}", "http_too_large")
        if n > len(self._in.buf) and not self.request.continued and \
                self.headers.get("Expect", "").lower() == "100-continue" and \
                self.request_version == "HTTP/1.1":
            self.request.continued = True
            self._out.write(CONTINUE)
        # a large body gets one more second per MIN_BODY_RATE bytes, so an 8 MiB upload
        # over a 2 Mbit/s link still arrives; a stalled one is still cut off
        self._in.deadline += n / MIN_BODY_RATE
        body = self.rfile.read(n)
        if len(body) < n:
            self.close_connection = True
            raise HttpError(400, f"body ended after {len(body)} of {n} bytes")
        return body


# ---------------------------------------------------------------- start-up
def load_api_key(env: str | None = None, file: str | None = None) -> str | None:
    key = _read_api_key(env, file)
    # header bytes arrive as latin-1 and clients encode a key as UTF-8: a non-ASCII key
    # could never match what a client sends
    if key is not None and not (key.isascii() and key.isprintable()):
        raise ApiError(f"API key from {env or file} must be printable ASCII "
                       f"(letters, digits, punctuation)")
    return key


def _read_api_key(env: str | None, file: str | None) -> str | None:
    if env and file:
        raise ApiError("give the API key by environment variable or by file, not both")
    if env:
        key = os.environ.get(env, "")
        if not key.strip():
            raise ApiError(f"API key variable {env} is not set or empty")
        return key.strip()
    if file:
        try:
            key = Path(file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ApiError(f"cannot read API key file {file}: {e}") from None
        if not key:
            raise ApiError(f"API key file {file} is empty")
        return key
    return None


def make_server(model_path: str, host: str = "127.0.0.1", port: int = 8080,
                api_key: str | None = None, max_body: int = MAX_BODY, **kw) -> ApiServer:
    """Load the model and bind; `serve_forever()` (or a thread) runs it.  Keywords named
    in LIMITS go to the server, the others to the service."""
    limits = {k: kw.pop(k) for k in list(kw) if k in LIMITS}
    service_kw = kw
    where = host_port(host, port)
    calibrate = service_kw.get("calibrate")
    if calibrate is not None and (problem := learning_rows_problem("--calibrate", calibrate)):
        raise ApiError(problem)         # as predict refuses it
    if not 0 <= port <= 65535:      # checked before the model loads: it takes seconds
        raise ApiError(f"cannot listen on {where}: port must be 0-65535")
    if service_kw.get("visualize"):
        try:
            import matplotlib  # noqa: F401  (checked now, not on the first request)
        except ImportError:
            raise ApiError("--visualize needs matplotlib: pip install 'tsad-agent[plot]'") from None
    try:
        svc = AnomalyService(model_path, **service_kw)
    except (DetectorError, ConfigError) as e:     # the model's policy or settings
        raise ApiError(str(e)) from None
    try:
        return ApiServer(svc, host, port, api_key, max_body, **limits)
    except OSError as e:        # in use, no such address, a host name that does not resolve
        raise ApiError(f"cannot listen on {where}: {e.strerror or e}") from None


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8080,
          api_key_env: str | None = None, api_key_file: str | None = None, **service_kw) -> int:
    key = load_api_key(api_key_env, api_key_file)
    srv = make_server(model_path, host, port, key, **service_kw)
    if not key and host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("listening on %s without an API key: anyone who can reach it can use it", host)

    def stop(signum, frame):
        # shutdown() waits for serve_forever to return: call it from another thread
        threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("tsad-agent API on %s (model %s on %s%s)", srv.url, srv.svc.meta.name,
             srv.svc.detector.ep, ", API key required" if key else "")
    try:
        srv.serve_forever()
    finally:
        srv.server_close()
    return 0
