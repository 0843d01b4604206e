"""Baselines reach the disk outside the detection thread.

`StateStore` writes each stream's file atomically, with two fsyncs.  The periodic save
(every stream at once, pipeline.SAVE_INTERVAL_S) and the end of a learning period that
many streams started together write hundreds of files in one go.  Done in the pipeline
thread, that stalled detection while the sources' queue filled: 500 streams took 1000
fsyncs, 0.4 s on this VM's disk and a hundred times as long on an SD card whose fsync
takes tens of milliseconds (benchmarks/bench_state_save.py).  `StateWriter` stands in
for the engine's `StateStore` (the same methods): it queues each save or forget and
applies them in a thread of its own.

Rules:
- `save` and `forget` only queue; the newest operation per stream replaces an older one
  still queued (a forget after a save deletes the file; a save after a forget writes the
  new baseline).  Operations are applied in the order their streams were queued.
- `load` of a stream with a queued operation applies it first, in the caller's thread,
  so a stream evicted and created again reads what it last saved.
- A write the disk refuses is `StateStore`'s business: kept, reported by `health`, and
  tried again when `retry` is called (the pipeline does on its health tick).
- `flush` returns once every queued operation is applied (before a reload hands over);
  `close` flushes and ends the thread (a clean stop).
"""
from __future__ import annotations

import logging
import threading

from .state_store import StateStore

log = logging.getLogger(__name__)

_FORGET = None


class StateWriter:
    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._ops: dict[str, tuple[str, dict] | None] = {}
        self._cv = threading.Condition()
        self._io = threading.Lock()         # one StateStore call at a time
        self._current: str | None = None    # the stream the thread is applying now
        self._retry = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="state-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the engine's side
    def save(self, stream: str, model_sha: str, record: dict) -> None:
        self._queue(stream, (model_sha, record))

    def forget(self, stream: str) -> None:
        self._queue(stream, _FORGET)

    def load(self, stream: str, model_sha: str, n_channels: int) -> dict | None:
        with self._cv:
            # taken from the queue, the operation is this thread's alone: the engine that
            # loads is the one that saves, so nothing newer is queued meanwhile
            self._cv.wait_for(lambda: self._current != stream)
            queued = stream in self._ops
            op = self._ops.pop(stream, _FORGET)
        if queued:
            self._apply(stream, op)
        return self.store.load(stream, model_sha, n_channels)

    def retry(self) -> None:
        with self._cv:
            self._retry = True
            self._cv.notify_all()

    def health(self) -> dict:
        return self.store.health()

    def queued(self) -> int:
        with self._cv:
            return len(self._ops) + (self._current is not None)

    def flush(self) -> None:
        with self._cv:
            self._cv.notify_all()
            self._cv.wait_for(lambda: not (self._ops or self._retry) and self._current is None)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()

    # ------------------------------------------------------------ the thread
    def _queue(self, stream: str, op) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the state writer is closed")
            self._ops.pop(stream, None)     # re-queued streams go to the back
            self._ops[stream] = op
            self._cv.notify_all()

    def _apply(self, stream: str, op) -> None:
        with self._io:
            if op is _FORGET:
                self.store.forget(stream)
            else:
                self.store.save(stream, *op)

    def _done(self) -> None:
        with self._cv:
            self._current = None
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: (self._ops or self._retry or self._closed)
                                  and self._current is None)
                if self._retry:
                    self._retry = False
                    stream = None
                elif self._ops:
                    stream = next(iter(self._ops))
                    op = self._ops.pop(stream)
                else:
                    return          # closed, nothing left
                self._current = stream if stream is not None else ""
            try:
                if stream is None:
                    with self._io:
                        self.store.retry()
                else:
                    self._apply(stream, op)
            except Exception:   # a bug, not a disk error (StateStore keeps those): go on
                log.exception("saving the baseline of stream %s failed", stream)
            finally:
                self._done()
