"""Bounded queues with an explicit overflow policy and drop counters.

Every queue in the engine is a :class:`BoundedQueue`.  When full:

* ``block``: the producer waits (file replay: nothing is lost);
* ``drop_oldest``: the oldest queued item is discarded to make room (live input and
  displays: freshest data wins, latency stays bounded);
* ``drop_newest``: the new item is discarded.

Control items (anything for which ``is_control(item)`` is true, e.g. StreamReset and
the end-of-stream marker) are never dropped: they are appended even past capacity,
which is bounded by the number of control items (a handful).
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable

POLICIES = ("block", "drop_oldest", "drop_newest")


class QueueClosed(Exception):
    """Raised by ``put`` after ``close()`` (the consumer has gone)."""


class _EndOfStream:
    def __repr__(self) -> str:
        return "END"


#: Marker put once by a producer when it is done.
END = _EndOfStream()


class BoundedQueue:
    """A thread-safe FIFO with capacity, policy and counters (``put``, ``dropped``, ``max_depth``)."""

    def __init__(
        self,
        name: str,
        capacity: int,
        policy: str = "block",
        is_control: Callable[[Any], bool] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"queue {name}: policy {policy!r} is not one of {', '.join(POLICIES)}")
        if capacity < 1:
            raise ValueError(f"queue {name}: capacity must be >= 1, got {capacity}")
        self.name = name
        self.capacity = int(capacity)
        self.policy = policy
        self._is_control = is_control or (lambda item: item is END)
        self._items: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        self.n_put = 0
        self.n_dropped = 0
        self.max_depth = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _n_data(self) -> int:
        return sum(1 for it in self._items if not self._is_control(it)) if self._items else 0

    def put(self, item: Any, stop: threading.Event | None = None) -> bool:
        """Enqueue ``item``; returns False if it (or an older item) was dropped.

        In ``block`` mode waits for room, re-checking ``stop`` every 50 ms so a stopped
        run never hangs on a full queue (the item is then discarded and counted).
        """
        control = self._is_control(item)
        with self._lock:
            if self._closed:
                raise QueueClosed(self.name)
            kept = True
            if not control and len(self._items) >= self.capacity:
                if self.policy == "block":
                    while len(self._items) >= self.capacity and not self._closed:
                        if stop is not None and stop.is_set():
                            self.n_dropped += 1
                            return False
                        self._not_full.wait(0.05)
                    if self._closed:
                        raise QueueClosed(self.name)
                elif self.policy == "drop_newest":
                    self.n_dropped += 1
                    return False
                else:  # drop_oldest: drop the oldest *data* item, keep control items
                    for i, old in enumerate(self._items):
                        if not self._is_control(old):
                            del self._items[i]
                            self.n_dropped += 1
                            kept = False
                            break
            self._items.append(item)
            self.n_put += 1
            self.max_depth = max(self.max_depth, len(self._items))
            self._not_empty.notify()
            return kept

    def get(self, timeout: float | None = None) -> Any:
        """Dequeue one item; raises TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._items:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(self.name)
                self._not_empty.wait(remaining if remaining is not None else 0.1)
            item = self._items.popleft()
            self._not_full.notify()
            return item

    def get_many(self, max_items: int, timeout: float | None = None) -> list[Any]:
        """Wait for at least one item, then take up to ``max_items`` without waiting.

        Stops early at a control item so that resets and END are seen in order and on
        their own.
        """
        first = self.get(timeout)
        out = [first]
        if self._is_control(first):
            return out
        with self._lock:
            while self._items and len(out) < max_items and not self._is_control(self._items[0]):
                out.append(self._items.popleft())
            self._not_full.notify_all()
        return out

    def data_next(self) -> bool:
        """True when the next item is data (not a control item): a ``get_many`` now returns data."""
        with self._lock:
            return bool(self._items) and not self._is_control(self._items[0])

    def close(self) -> None:
        """Refuse further puts and wake blocked producers (consumer is gone)."""
        with self._lock:
            self._closed = True
            self._not_full.notify_all()
            self._not_empty.notify_all()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "depth": len(self._items),
                "capacity": self.capacity,
                "policy": self.policy,
                "put": self.n_put,
                "dropped": self.n_dropped,
                "max_depth": self.max_depth,
            }
