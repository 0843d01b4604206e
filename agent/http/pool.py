"""The HTTP server's connections: what a hostile or merely crowded network can do to
it is bounded here, with the standard library only.

    accept thread -> watcher thread (request heads) -> queue -> worker threads
                     ^-- kept-alive connections, and every close  <--'

Rules:
- Listen backlog `BACKLOG` (1024, capped by the kernel's somaxconn, 4096 on current
  kernels): a burst of connections waits in the kernel instead of being dropped.  The
  accept thread only accepts, every waiting connection at each wake-up.
- The watcher thread (`transport.Watcher`, a selector) holds every connection that
  has not yet sent a complete request head, and a complete body when that is small
  (up to 64 KiB, any /anomaly request; after `Expect: 100-continue` too: it sends the
  "100 Continue" itself): at most `MAX_OPEN` (512) connections, beyond
  which a new one gets 503.  Slow or silent clients cost a socket and at most 80 KiB
  of buffer (40 MiB for all), never a worker: a client sending a byte a second holds
  no thread at all.
- A complete request joins a queue of at most `queue_size` requests served by a fixed
  pool of `threads` workers.  A request with a large body (over 64 KiB: the PaddleX
  endpoint) joins its own queue of at most `large_queue`, served by `large_threads`
  workers of its own, which read the body (under the same deadline) and process it:
  large requests never hold the workers of small ones, at most `large_threads` large
  bodies are in memory at once, and their memory stays in those threads' malloc
  arenas.  A full queue answers 503 with Retry-After at once.
- Whole-request deadline: a request's head and body must arrive within `deadline_s`
  of its first byte (for a new connection: of its accept), not counting the time it
  waits for a worker (a large body gets one second more per 256 KiB: `server`).  A
  request cut off gets 408 (a connection that never sent a byte is closed
  silently); a worker reading a large body cut off is freed.  A response must be
  taken within `deadline_s` too.
- Keep-alive: after a response the connection goes back to the watcher, which waits
  up to `idle_s` for the next request; bytes already read (pipelining) go with it.
- Closes linger (`transport`): a client refused before its body was read still gets
  its answer, not a reset.
- File descriptors: MAX_OPEN + both queues + both pools + MAX_LINGER (924 by default)
  stay under the usual limit of 1024; an accept that fails for lack of them pauses
  instead of spinning.
"""
from __future__ import annotations

import errno
import logging
import queue
import socketserver
import threading
import time
from collections import Counter

from .transport import SMALL_BODY, Conn, Watcher, body_length, busy_response, head_end, send_now

log = logging.getLogger("tsad.http")

BACKLOG = 1024


class PooledServer(socketserver.TCPServer):
    """A TCP server whose requests are served by a fixed pool of worker threads; the
    handler serves exactly one request per call (`finish_request`)."""
    request_queue_size = BACKLOG
    allow_reuse_address = True

    def __init__(self, address, handler, threads: int, queue_size: int, large_threads: int,
                 large_queue: int, deadline_s: float, idle_s: float):
        self.deadline_s, self.idle_s = deadline_s, idle_s
        # busy_queue, busy_large_queue, busy_open, timeout (`bump`, `stats_now`)
        self.stats: Counter = Counter()
        self._stats_lock = threading.Lock()
        self._queues = {"": queue.Queue(queue_size), "large_": queue.Queue(large_queue)}
        self._full_logged = 0.0
        self.watcher = Watcher(self._enqueue, self.bump, deadline_s, answered=self.answered)
        # a failed bind calls server_close() from inside super().__init__: it must find
        # the workers (none yet) and stop the watcher
        self._workers: list = []
        super().__init__(address, handler)
        # (thread, the queue it serves)
        self._workers = [(threading.Thread(target=self._work, args=(self._queues[kind],),
                                           name=f"http-{kind}{i}", daemon=True),
                          self._queues[kind])
                         for kind, n in (("", threads), ("large_", large_threads))
                         for i in range(n)]
        for t, _ in self._workers:
            t.start()

    def answered(self, code: int) -> None:
        """The watcher answered a request no worker saw (a subclass counts it)."""

    def bump(self, what: str) -> None:
        with self._stats_lock:
            self.stats[what] += 1

    def stats_now(self) -> Counter:
        with self._stats_lock:
            return Counter(self.stats)

    @property
    def waiting(self) -> int:
        """Requests whose head is in, waiting for a worker."""
        return sum(q.qsize() for q in self._queues.values())

    # ------------------------------------------------------------ accept thread
    def server_activate(self) -> None:
        super().server_activate()
        self.socket.setblocking(False)

    def _handle_request_noblock(self) -> None:
        """Accept every connection waiting, not one per wake-up of serve_forever: a
        burst of 200 connects must not overflow the backlog while the accept thread
        waits its turn for the interpreter."""
        for _ in range(BACKLOG):
            try:
                request, client_address = self.get_request()
            except OSError:             # BlockingIOError: none left
                return
            self.process_request(request, client_address)

    def get_request(self):
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                now = time.monotonic()
                if now - self._full_logged > 60:
                    self._full_logged = now
                    log.error("cannot accept connections: out of file descriptors (%s)", e)
                time.sleep(0.1)     # the listening socket stays readable: do not spin
            raise

    def process_request(self, request, client_address) -> None:
        self.watcher.watch(Conn(request, client_address, started=time.monotonic()))

    def shutdown_request(self, request) -> None:
        self.watcher.close(request)

    def handle_error(self, request, client_address) -> None:
        log.exception("connection from %s failed", client_address[0])

    # ------------------------------------------------------------ watcher thread
    def _enqueue(self, conn: Conn) -> None:
        conn.queued = time.monotonic()
        kind = "large_" if body_length(conn.buf, head_end(conn.buf)) > SMALL_BODY else ""
        try:
            self._queues[kind].put_nowait(conn)
        except queue.Full:
            self.bump(f"busy_{kind}queue")
            send_now(conn.sock, busy_response("too many requests waiting"))
            self.watcher.close(conn.sock)

    # ------------------------------------------------------------ workers
    def _work(self, q: queue.Queue) -> None:
        while True:
            conn = q.get()
            if conn is None:
                return
            conn.started += time.monotonic() - conn.queued   # that wait is not the client's
            try:
                keep = self.finish_request(conn, conn.addr)
            except Exception:
                self.handle_error(conn.sock, conn.addr)
                keep = False
            if keep:
                now = time.monotonic()
                conn.started = now if conn.buf else None
                conn.idle_end = now + self.idle_s
                conn.continued = False
                self.watcher.watch(conn)
            else:
                self.watcher.close(conn.sock)

    def finish_request(self, conn: Conn, client_address) -> bool:
        """Serve one request; whether the connection stays open for the next."""
        return not self.RequestHandlerClass(conn, client_address, self).close_connection

    def server_close(self) -> None:
        """Stop listening, drop waiting requests, stop the workers once they are done."""
        super().server_close()
        for q in self._queues.values():
            while True:
                try:
                    conn = q.get_nowait()
                except queue.Empty:
                    break
                if conn is not None:
                    conn.sock.close()
        for _, q in self._workers:
            q.put(None)
        end = time.monotonic() + self.deadline_s
        for t, _ in self._workers:
            t.join(max(0.0, end - time.monotonic()))
        self.watcher.stop()
