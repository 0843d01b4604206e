"""The bounded hand-off from the source threads (and operator commands) to the pipeline.

Rules:
- Nothing put is ever lost: with `maxsize` items waiting, `put` blocks until there is
  room (back-pressure up to the source: the serial port's buffer, the broker's session
  queue) or its timeout passes, and then says so (False); the caller counts that.
- A producer pays a deque append and, only when the consumer may be asleep, one wake-up.
  queue.Queue takes a lock and notifies a condition for every item: at 5,000 MQTT
  messages/s that, and waking the pipeline thread per message, cost the network thread
  more than the message itself (benchmarks/bench_ingest.py).
- The bound holds to within the number of producer threads: the check and the append
  are not one atomic step.  It bounds memory, not an exact count.
- Producers blocked on a full inbox resume once it is half empty.
- One consumer (the pipeline thread) takes items, oldest first.
"""
from __future__ import annotations

import threading
from collections import deque


class Inbox:
    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque = deque()
        self._ready = threading.Event()      # set: items may be waiting
        self._room = threading.Condition()   # producers wait here while it is full
        self._blocked = 0                    # producers waiting for room

    def put(self, item, timeout: float | None = None) -> bool:
        """Append `item`; False when the inbox stayed full for `timeout` s."""
        items = self._items
        if len(items) >= self.maxsize:
            with self._room:
                self._blocked += 1
                try:
                    if not self._room.wait_for(lambda: len(items) < self.maxsize, timeout):
                        return False
                finally:
                    self._blocked -= 1
        items.append(item)
        if not self._ready.is_set():    # a plain attribute read: the wake-up is the cost
            self._ready.set()
        return True

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` s for an item; True when one is waiting."""
        if self._items:
            return True
        self._ready.clear()
        # an item put between the check and the clear found the event still set
        return bool(self._items) or (self._ready.wait(timeout) and bool(self._items))

    def pop(self):
        """The oldest item, or None when there is none."""
        try:
            item = self._items.popleft()
        except IndexError:
            return None
        # blocked producers are woken once half the room is free, not for every item:
        # a full inbox would otherwise switch threads per item
        if self._blocked and len(self._items) <= self.maxsize // 2:
            with self._room:
                self._room.notify_all()
        return item

    def qsize(self) -> int:
        return len(self._items)
