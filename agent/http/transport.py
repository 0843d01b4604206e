"""Connections for the HTTP API: what a hostile or merely crowded network can do to the
server is bounded here, with the standard library only.

Rules:
- Listen backlog `BACKLOG` (128): a burst of connections waits in the kernel instead of
  being reset.  The accept thread only accepts and queues.
- A fixed pool of `workers` threads serves connections taken from a queue of at most
  `queue` waiting connections.  When the queue is full the accept thread itself answers
  503 with Retry-After at once and closes: a crowd costs sockets, never threads.
- Whole-request deadline: a request's line, headers and body must all arrive within
  `deadline_s` of the worker starting to read it (every read waits only for the time
  left), so a client sending a byte a second is cut off at the deadline and its worker
  freed.  A response must be taken within `deadline_s` too.
- Keep-alive: between requests a worker waits at most `idle_s` for the next one, and
  gives the connection up as soon as other connections are queued.
- Closing never resets a client: a socket closed with unread input sends RST, which can
  destroy the response still in flight (a 413 or 503 refused before its body was read).
  The closer thread half-closes, reads and discards what still comes for up to
  `LINGER_S`, then closes; at most `MAX_LINGER` sockets at once (beyond that the oldest
  is closed at once).
"""
from __future__ import annotations

import io
import json
import logging
import queue
import selectors
import socket
import socketserver
import threading
import time
import uuid
from collections import Counter

log = logging.getLogger("tsad.http")

BACKLOG = 128
LINGER_S = 2.0
MAX_LINGER = 1024
RETRY_AFTER_S = 1


class DeadlineReader(io.RawIOBase):
    """Socket input where every read waits only until `deadline` (monotonic seconds)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.deadline = float("inf")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        self.sock.settimeout(left)
        return self.sock.recv_into(b)


class DeadlineWriter:
    """Socket output where the writes of one response end by `deadline`."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.deadline = float("inf")

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("response not taken in time")
            self.sock.settimeout(left)
            view = view[self.sock.send(view):]
        return len(data)

    def flush(self) -> None:
        pass


class Closer:
    """Lingering close on one thread: half-close, drain, close (see the module doc)."""

    def __init__(self, linger_s: float = LINGER_S, max_open: int = MAX_LINGER):
        self.linger_s, self.max_open = linger_s, max_open
        self._sel = selectors.DefaultSelector()
        self._incoming: list[socket.socket] = []
        self._open: dict[socket.socket, float] = {}     # insertion order = age
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="http-closer", daemon=True)
        self._thread.start()

    def close(self, sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
        except OSError:             # already gone: nothing to linger for
            sock.close()
            return
        with self._lock:
            if self._stopped:
                sock.close()
                return
            self._incoming.append(sock)
        self._wake()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        self._wake()
        self._thread.join(5)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:             # the wake pipe is full: the thread is awake anyway
            pass

    def _run(self) -> None:
        while True:
            with self._lock:
                new, self._incoming = self._incoming, []
                stopped = self._stopped
            if stopped:
                break
            self._admit(new)
            now = time.monotonic()
            wait = min(self._open.values(), default=now + 60) - now
            for key, _ in self._sel.select(max(wait, 0)):
                if key.fileobj is self._wake_r:
                    _recv(self._wake_r)
                elif not _recv(key.fileobj):
                    self._drop(key.fileobj)
            now = time.monotonic()
            for sock in [s for s, end in self._open.items() if end <= now]:
                self._drop(sock)
        for sock in list(self._open) + new:
            self._drop(sock)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _admit(self, new: list[socket.socket]) -> None:
        for sock in new:
            while len(self._open) >= self.max_open:
                self._drop(next(iter(self._open)))
            self._open[sock] = time.monotonic() + self.linger_s
            self._sel.register(sock, selectors.EVENT_READ)

    def _drop(self, sock: socket.socket) -> None:
        if self._open.pop(sock, None) is not None:
            self._sel.unregister(sock)
        sock.close()


def _recv(sock: socket.socket) -> bool:
    """Read and discard what is there; False at end of stream (or error)."""
    try:
        return bool(sock.recv(65536))
    except BlockingIOError:
        return True
    except OSError:
        return False


def busy_response() -> bytes:
    body = json.dumps({"logId": str(uuid.uuid4()), "errorCode": 503,
                       "errorMsg": "server busy: too many connections waiting; retry later"})
    return (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER_S}\r\n"
            f"Connection: close\r\n\r\n{body}").encode()


class PooledServer(socketserver.TCPServer):
    """A TCP server whose connections are served by a fixed pool of worker threads."""
    request_queue_size = BACKLOG
    allow_reuse_address = True

    def __init__(self, address, handler, workers: int, queue_size: int, deadline_s: float,
                 idle_s: float):
        self.deadline_s, self.idle_s = deadline_s, idle_s
        # busy_queue, busy_large_body, timeout; read by /metrics
        self.stats: Counter = Counter()
        self._queue: queue.Queue = queue.Queue(queue_size)
        self._closer = Closer()
        try:
            super().__init__(address, handler)
        except OSError:
            self._closer.stop()
            raise
        self._workers = [threading.Thread(target=self._work, name=f"http-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._workers:
            t.start()

    @property
    def waiting(self) -> int:
        """Connections accepted and not yet taken by a worker."""
        return self._queue.qsize()

    def process_request(self, request, client_address) -> None:
        try:
            self._queue.put_nowait((request, client_address))
        except queue.Full:
            self.stats["busy_queue"] += 1
            try:
                request.setblocking(False)
                # a fresh socket's send buffer is empty: this small answer never blocks
                request.send(busy_response())
            except OSError:
                pass
            self.shutdown_request(request)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            request, addr = item
            try:
                self.finish_request(request, addr)
            except Exception:
                self.handle_error(request, addr)
            finally:
                self.shutdown_request(request)

    def shutdown_request(self, request) -> None:
        self._closer.close(request)

    def handle_error(self, request, client_address) -> None:
        log.exception("connection from %s failed", client_address[0])

    def server_close(self) -> None:
        """Stop listening, close queued connections, stop the workers once they are done."""
        super().server_close()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].close()
        for _ in self._workers:
            self._queue.put(None)
        for t in self._workers:
            t.join(self.deadline_s)
        self._closer.stop()
