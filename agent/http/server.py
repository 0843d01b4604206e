"""The HTTP side of `tsad-agent serve` (standard library only).

POST /time-series-anomaly-detection  PaddleX serving contract: {"csv": base64 CSV} ->
                                     {"logId", "errorCode": 0, "errorMsg": "Success",
                                      "result": {"csv": base64 `timestamp,label`, "image"}};
                                     the labels are `agent.prediction.predict`'s, same settings.
POST /anomaly                        {"values": [[C] x window]} -> one score (model's scaler
                                     and threshold); {"stream", "values": [C], "ts"?} -> one
                                     sample into a named stream run by the daemon's engine
                                     (learning period, ring buffer, alert hysteresis).
GET  /healthz, /metrics (Prometheus text 0.0.4), /openapi.json

Every error is {"logId", "errorCode": HTTP status, "errorMsg"}; no traceback ever
reaches a client.  With an API key (X-API-Key or Authorization: Bearer, compared in
constant time) everything but /healthz and /openapi.json needs it: probes and API
browsers carry no secrets.  Binds 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import os
import re
import signal
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from .. import __version__
from ..config_base import STREAM_ID_CHARS
from ..detector import DetectorError
from .openapi import PADDLEX_PATH, build_spec
from .prometheus import metrics_text
from .service import AnomalyService, InputError, TooManyStreams

log = logging.getLogger("tsad.http")

MAX_BODY = 8 << 20
STREAM_ID = re.compile(rf"^{STREAM_ID_CHARS}{{1,64}}$")
ROUTES = {PADDLEX_PATH: "POST", "/anomaly": "POST", "/healthz": "GET", "/metrics": "GET",
          "/openapi.json": "GET"}
OPEN_PATHS = {"/healthz", "/openapi.json"}


class ApiError(RuntimeError):
    """The server cannot start (key not set, port taken, ...); one line."""


class HttpError(Exception):
    def __init__(self, status: int, msg: str, reason: str | None = None,
                 headers: dict | None = None):
        super().__init__(msg)
        self.status, self.msg, self.reason, self.headers = status, msg, reason, headers


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# ---------------------------------------------------------------- request parsing
def _json_body(body: bytes) -> dict:
    try:
        doc = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:   # UnicodeDecodeError is a ValueError
        raise HttpError(400, f"body is not JSON: {' '.join(str(e).split())[:200]}",
                        "http_json") from None
    if not isinstance(doc, dict):
        raise HttpError(422, f"body must be a JSON object, got {type(doc).__name__}", "http_shape")
    return doc


def _matrix(v, rows: int, cols: int, what: str) -> np.ndarray:
    """A finite float32 matrix of exactly [rows, cols]."""
    ok = (isinstance(v, list) and all(isinstance(r, list) for r in v)
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) for r in v for x in r))
    if not ok:
        raise HttpError(422, f"{what} must be a list of lists of numbers", "http_shape")
    got = sorted({len(r) for r in v})
    if len(v) != rows or got != [cols]:
        raise HttpError(422, f"{what} must be [{rows} x {cols}] (samples x channels), got "
                             f"{len(v)} row(s) of {', '.join(map(str, got)) or 'no'} value(s)",
                        "http_shape")
    a = np.asarray(v, np.float64)
    if not np.isfinite(a).all() or np.abs(a).max(initial=0) > 3e38:
        raise HttpError(422, f"{what} must be finite float32 numbers", "http_shape")
    return a.astype(np.float32)


def handle_paddlex(svc: AnomalyService, doc: dict) -> dict:
    csv_b64 = doc.get("csv")
    if not isinstance(csv_b64, str) or not csv_b64:
        raise HttpError(422, "field 'csv' (base64 of a CSV file) is required", "http_shape")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://", csv_b64):
        raise HttpError(422, "'csv' is a URL: this server does not fetch URLs (no network); "
                             "send the file as base64", "http_url")
    try:
        data = base64.b64decode(csv_b64, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, "field 'csv' is not valid base64", "http_base64") from None
    text, image = svc.predict_csv(data)
    return {"logId": str(uuid.uuid4()), "errorCode": 0, "errorMsg": "Success",
            "result": {"csv": base64.b64encode(text.encode()).decode("ascii"), "image": image}}


def handle_anomaly(svc: AnomalyService, doc: dict) -> dict:
    w, c = svc.meta.window, svc.meta.n_channels
    if "stream" not in doc:
        return svc.score_window(_matrix(doc.get("values"), w, c, "values"))
    sid = doc["stream"]
    if not isinstance(sid, str) or not STREAM_ID.match(sid):
        raise HttpError(422, "stream must be 1-64 characters of A-Z a-z 0-9 _ . -", "http_shape")
    ts = doc.get("ts", time.time())
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not np.isfinite(ts):
        raise HttpError(422, "ts must be a number (epoch seconds)", "http_shape")
    v = doc.get("values")
    if isinstance(v, list) and v and isinstance(v[0], list):
        raise HttpError(422, "with 'stream', values is ONE sample: a list of "
                             f"{c} numbers", "http_shape")
    return svc.push_sample(sid, float(ts), _matrix([v], 1, c, "values")[0])


# ---------------------------------------------------------------- HTTP
class ApiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, svc: AnomalyService, host: str, port: int, api_key: str | None = None,
                 max_body: int = MAX_BODY):
        self.svc, self.api_key, self.max_body = svc, api_key, max_body
        self.requests: Counter = Counter()
        self._req_lock = threading.Lock()
        self.spec = json.dumps(build_spec(svc.meta, svc.detector.ep, max_body, bool(api_key)),
                               indent=1).encode()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def count(self, path: str, code: int) -> None:
        with self._req_lock:
            self.requests[(path if path in ROUTES else "other", code)] += 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"tsad-agent/{__version__}"
    sys_version = ""
    timeout = 30        # a client that stops sending frees its thread
    server: ApiServer

    # ------------------------------------------------------------ plumbing
    def log_message(self, fmt, *args) -> None:
        log.debug("%s " + fmt, self.client_address[0], *args)

    def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
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
        self.server.count(getattr(self, "_route", "other"), code)

    def _json(self, code: int, doc: dict, extra: dict | None = None) -> None:
        self._send(code, json.dumps(doc).encode(), "application/json", extra)

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

    # ------------------------------------------------------------ dispatch
    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        self._route = path
        try:
            self._handle(path)
        except HttpError as e:
            if e.reason:
                self.server.svc.metrics.bad(e.reason)
            self._error(e.status, e.msg, e.headers)
        except InputError as e:
            self.server.svc.metrics.bad("http_input")
            self._error(422, str(e))
        except TooManyStreams as e:
            self.server.svc.metrics.bad("http_streams")
            self._error(429, str(e))
        except DetectorError as e:
            log.error("%s: %s", path, e)
            self._error(500, "inference failed; see the server log")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            log.exception("unhandled error on %s %s", self.command, path)
            self.close_connection = True
            self._error(500, "internal error; see the server log")

    def _handle(self, path: str) -> None:
        srv, svc = self.server, self.server.svc
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
        if path == "/healthz":
            return self._json(200, {"status": "ok", "model": svc.meta.name, "ep": svc.detector.ep})
        if path == "/openapi.json":
            return self._send(200, srv.spec, "application/json")
        if path == "/metrics":
            return self._send(200, metrics_text(svc, srv.requests).encode(),
                              "text/plain; version=0.0.4; charset=utf-8")
        doc = _json_body(self._body())
        handler = handle_paddlex if path == PADDLEX_PATH else handle_anomaly
        self._json(200, handler(svc, doc))

    def _authorized(self, key: str) -> bool:
        given = self.headers.get("X-API-Key")
        if given is None:
            auth = self.headers.get("Authorization", "")
            if auth[:7].lower() == "bearer ":
                given = auth[7:].strip()
        return given is not None and hmac.compare_digest(given.encode(), key.encode())

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HttpError(411, "send a Content-Length; chunked bodies are not accepted")
        raw = self.headers.get("Content-Length")
        if raw is None:
            self.close_connection = True
            raise HttpError(411, "Content-Length required")
        try:
            n = int(raw)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise HttpError(400, f"bad Content-Length {raw[:40]!r}") from None
        if n > self.server.max_body:
            self.close_connection = True   # the body is never read
            raise HttpError(413, f"body of {n} bytes is over the {self.server.max_body}-byte limit",
                            "http_too_large")
        body = self.rfile.read(n)
        if len(body) < n:
            self.close_connection = True
            raise HttpError(400, f"body ended after {len(body)} of {n} bytes")
        return body


# ---------------------------------------------------------------- start-up
def load_api_key(env: str | None = None, file: str | None = None) -> str | None:
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
                api_key: str | None = None, max_body: int = MAX_BODY, **service_kw) -> ApiServer:
    """Load the model and bind; `serve_forever()` (or a thread) runs it."""
    if service_kw.get("visualize"):
        try:
            import matplotlib  # noqa: F401  (checked now, not on the first request)
        except ImportError:
            raise ApiError("--visualize needs matplotlib: pip install 'tsad-agent[plot]'") from None
    try:
        svc = AnomalyService(model_path, **service_kw)
    except DetectorError as e:
        raise ApiError(str(e)) from None
    try:
        return ApiServer(svc, host, port, api_key, max_body)
    except OSError as e:
        raise ApiError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


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
