"""The pieces of the HTTP server's connection handling (`pool` puts them together and
states the rules): a connection between requests (`Conn`), input and output that end
at a deadline, answers sent without a handler, and the watcher thread that holds
every connection no worker holds.

The watcher is one selector loop: it reads each request until its head is complete,
and its body too when that is small (SMALL_BODY, all /anomaly needs), then hands it
on (it reads Content-Length by `content_length`, the handler's rule too, and says
"100 Continue" to a small body's `Expect`); it answers 408 to requests cut off by the
deadline and 431 to heads over
MAX_HEAD, and lingers closes: a socket closed with unread input sends RST, which
can destroy the response still in flight (a 413 or 503 refused before its body was
read), so it half-closes, reads and discards what still comes for up to LINGER_S,
then closes; at most MAX_LINGER at once (beyond, the oldest is closed).
"""
from __future__ import annotations

import json
import re
import selectors
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

MAX_OPEN = 512
MAX_HEAD = 16 * 1024
LINGER_S = 2.0
MAX_LINGER = 128
RETRY_AFTER_S = 1
SMALL_BODY = 64 * 1024
_HEAD_ENDS = (b"\r\n\r\n", b"\n\n")
# a length this long is no body any server takes; the bound keeps int() cheap
MAX_LENGTH_DIGITS = 18
_LENGTH = re.compile(rb"\ncontent-length:([^\r\n]*)", re.IGNORECASE)
_EXPECT = re.compile(rb"\nexpect:[ \t]*100-continue[ \t]*\r?\n", re.IGNORECASE)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(eq=False)
class Conn:
    """A connection between requests: its socket, bytes read ahead, and timing."""
    sock: socket.socket
    addr: tuple
    buf: bytearray = field(default_factory=bytearray)
    started: float | None = None    # monotonic time the current request began arriving
    idle_end: float = 0.0           # kept alive: when to give up waiting for a request
    queued: float = 0.0             # when its head joined the queue for a worker
    continued: bool = False         # "100 Continue" sent for the current request

    def deadline(self, deadline_s: float) -> float:
        return self.idle_end if self.started is None else self.started + deadline_s


def head_end(buf: bytes | bytearray) -> int | None:
    """Where the request head in `buf` ends (after its blank line); None if it does not yet."""
    ends = [i + len(e) for e in _HEAD_ENDS if (i := buf.find(e)) >= 0]
    return min(ends) if ends else None


def head_too_big(buf: bytes | bytearray) -> bool:
    end = head_end(buf)
    return (len(buf) if end is None else end) > MAX_HEAD


def content_length(values: list[str]) -> int | None:
    """The Content-Length of a request from its header values (None without one), by
    the one rule of the watcher and the handler: every value is 1*DIGIT (RFC 9110), at
    most MAX_LENGTH_DIGITS long; repeated equal values (in one header as a list, or in
    several) count once.  ValueError otherwise, differing values included: a length
    that two parsers could read differently is how requests are smuggled."""
    found = set()
    for value in values:
        for part in value.split(","):
            n = part.strip(" \t")
            if not (n.isascii() and n.isdigit() and len(n) <= MAX_LENGTH_DIGITS):
                raise ValueError(f"bad Content-Length {value.strip()[:40]!r}: digits only")
            found.add(int(n))
    if len(found) > 1:
        raise ValueError(f"conflicting Content-Length values {sorted(found)}")
    return found.pop() if found else None


def body_length(buf: bytes | bytearray, end: int) -> int:
    """The Content-Length of the head buf[:end]: 0 when it has none, or a bad one (the
    request goes to a worker at once, which refuses it without reading a body)."""
    values = [m.decode("latin-1") for m in _LENGTH.findall(bytes(buf[:end]))]
    try:
        return content_length(values) or 0
    except ValueError:
        return 0


def expects_continue(buf: bytes | bytearray, end: int) -> bool:
    """`Expect: 100-continue` on an HTTP/1.1 request (HTTP/1.0 ignores it: RFC 9110)."""
    line = bytes(buf[:buf.find(b"\n")]).rstrip(b"\r")
    return line.endswith(b" HTTP/1.1") and bool(_EXPECT.search(bytes(buf[:end])))


def request_ready(conn: Conn) -> bool:
    """Whether a worker can take the request without waiting for the client: the head
    is complete and so is its body when that is small (up to SMALL_BODY); a larger
    body is the large-body worker's to read.  A small body awaited after `Expect:
    100-continue` is awaited here: the watcher sends "100 Continue" itself, so a
    client that never sends the body holds no worker."""
    buf = conn.buf
    end = head_end(buf)
    if end is None:
        return False
    n = body_length(buf, end)
    if n > SMALL_BODY or len(buf) >= end + n:
        return True
    if not conn.continued and len(buf) == end and expects_continue(buf, end):
        conn.continued = True
        send_now(conn.sock, CONTINUE)   # a few bytes on a socket with nothing unsent
    return False


def error_response(code: int, reason: str, msg: str, extra: str = "") -> bytes:
    """A whole `Connection: close` error response, for answers sent without a handler."""
    body = json.dumps({"logId": str(uuid.uuid4()), "errorCode": code, "errorMsg": msg})
    return (f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n{body}").encode()


def busy_response(why: str) -> bytes:
    return error_response(503, "Service Unavailable", f"server busy: {why}; retry later",
                          f"Retry-After: {RETRY_AFTER_S}\r\n")


class DeadlineReader:
    """Buffered socket input for one request; every wait for data ends at `deadline`."""

    def __init__(self, sock: socket.socket, buf: bytearray, deadline: float):
        self.sock, self.buf, self.deadline = sock, buf, deadline

    def _wait(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self.sock.settimeout(left)

    def readline(self, limit: int = -1) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0 and (limit < 0 or i < limit):
                n = i + 1
                break
            if 0 <= limit <= len(self.buf):
                n = limit
                break
            self._wait()
            data = self.sock.recv(65536)
            if not data:
                n = len(self.buf)
                break
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read(self, n: int) -> bytearray:
        """n bytes (fewer if the client closes), received straight into one buffer."""
        out = bytearray(n)
        got = min(n, len(self.buf))
        out[:got] = self.buf[:got]
        del self.buf[:got]
        with memoryview(out) as view:
            while got < n:
                self._wait()
                k = self.sock.recv_into(view[got:])
                if not k:
                    break
                got += k
        del out[got:]
        return out

    def close(self) -> None:
        pass


class DeadlineWriter:
    """Socket output; the writes of one response end by `deadline`."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline

    def write(self, data: bytes) -> int:
        with memoryview(data) as view:
            while view:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("response not taken in time")
                self.sock.settimeout(left)
                view = view[self.sock.send(view):]
        return len(data)

    def flush(self) -> None:
        pass


def send_now(sock: socket.socket, data: bytes) -> None:
    """A small answer on a socket with an empty send buffer: never blocks."""
    try:
        sock.setblocking(False)
        sock.send(data)
    except OSError:
        pass


class Watcher:
    """One selector thread for the connections no worker holds: those waiting for a
    complete request head (handed to `on_head(conn)` when it is), and those lingering
    before their close.  `count(what)` counts "timeout" (a request cut off by its
    deadline) and "busy_open" (a new connection refused: MAX_OPEN reached)."""

    def __init__(self, on_head, count, deadline_s: float, max_open: int = MAX_OPEN,
                 max_linger: int = MAX_LINGER, linger_s: float = LINGER_S,
                 answered=lambda code: None):
        self.on_head, self.count, self.deadline_s = on_head, count, deadline_s
        self.answered = answered    # (status) of each answer it sends itself: 408, 431
        self.max_open, self.max_linger, self.linger_s = max_open, max_linger, linger_s
        self._sel = selectors.DefaultSelector()
        self._heads: dict[socket.socket, Conn] = {}
        self._linger: dict[socket.socket, float] = {}      # insertion order = age
        self._incoming: list[tuple[str, object]] = []
        self._lock = threading.Lock()
        self._stopped = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="http-watcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ any thread
    def watch(self, conn: Conn) -> None:
        """Wait for the connection's next request head."""
        self._post("head", conn)

    def close(self, sock: socket.socket) -> None:
        """Lingering close (see the module doc)."""
        self._post("linger", sock)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        self._wake()
        self._thread.join(5)

    def _post(self, kind: str, item) -> None:
        with self._lock:
            taken = not self._stopped
            if taken:
                self._incoming.append((kind, item))
        if taken:
            self._wake()
        else:                       # stopped: nothing waits or lingers any more
            (item.sock if kind == "head" else item).close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:             # the wake pipe is full: the thread is awake anyway
            pass

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        new: list = []
        while True:
            with self._lock:
                new, self._incoming = self._incoming, []
                stopped = self._stopped
            if stopped:
                break
            for kind, item in new:
                self._admit(item) if kind == "head" else self._start_linger(item)
            wait = self._next_deadline() - time.monotonic()
            for key, _ in self._sel.select(max(wait, 0)):
                sock = key.fileobj
                if sock is self._wake_r:
                    _discard(sock)
                elif sock in self._heads:
                    self._read_head(sock)
                elif not _discard(sock):
                    self._forget(sock)
                    sock.close()
            self._expire(time.monotonic())
        for sock in list(self._heads) + list(self._linger):
            self._forget(sock)
            sock.close()
        for kind, item in new:
            (item.sock if kind == "head" else item).close()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _next_deadline(self) -> float:
        ends = [c.deadline(self.deadline_s) for c in self._heads.values()]
        ends += self._linger.values()
        return min(ends, default=time.monotonic() + 60)

    def _admit(self, conn: Conn) -> None:
        if head_too_big(conn.buf):
            self._refuse_head(conn.sock)
        elif request_ready(conn):       # pipelined: the next request is already here
            self.on_head(conn)
        elif len(self._heads) >= self.max_open:
            if conn.started is not None:    # a new client, not an idle kept-alive one
                self.count("busy_open")
                send_now(conn.sock, busy_response("too many open connections"))
            self._start_linger(conn.sock)
        else:
            conn.sock.setblocking(False)
            self._heads[conn.sock] = conn
            self._sel.register(conn.sock, selectors.EVENT_READ)

    def _read_head(self, sock: socket.socket) -> None:
        conn = self._heads[sock]
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:                        # the client left
            self._forget(sock)
            sock.close()
            return
        if conn.started is None:
            conn.started = time.monotonic()
        conn.buf += data
        if head_too_big(conn.buf):
            self._forget(sock)
            self._refuse_head(sock)
        elif request_ready(conn):
            self._forget(sock)
            self.on_head(conn)

    def _refuse_head(self, sock: socket.socket) -> None:
        self.answered(431)      # counted before it is sent, as every answer is (server.py)
        send_now(sock, error_response(431, "Request Header Fields Too Large",
                                      f"request head over {MAX_HEAD} bytes"))
        self._start_linger(sock)

    def _expire(self, now: float) -> None:
        for sock, conn in [(s, c) for s, c in self._heads.items()
                           if c.deadline(self.deadline_s) <= now]:
            self._forget(sock)
            if conn.buf:
                self.count("timeout")
                self.answered(408)
                send_now(sock, error_response(408, "Request Timeout", "request not received "
                                              f"within {self.deadline_s:g} s"))
            elif conn.started is not None:  # connected, never said a word
                self.count("timeout")
            self._start_linger(sock)
        for sock in [s for s, end in self._linger.items() if end <= now]:
            self._forget(sock)
            sock.close()

    def _start_linger(self, sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
        except OSError:                     # already gone: nothing to linger for
            sock.close()
            return
        while len(self._linger) >= self.max_linger:
            oldest = next(iter(self._linger))
            self._forget(oldest)
            oldest.close()
        self._linger[sock] = time.monotonic() + self.linger_s
        self._sel.register(sock, selectors.EVENT_READ)

    def _forget(self, sock: socket.socket) -> None:
        if self._heads.pop(sock, None) is not None or self._linger.pop(sock, None) is not None:
            self._sel.unregister(sock)


def _discard(sock: socket.socket) -> bool:
    """Read and drop what is there; False at end of stream (or on error)."""
    try:
        return bool(sock.recv(65536))
    except BlockingIOError:
        return True
    except OSError:
        return False
