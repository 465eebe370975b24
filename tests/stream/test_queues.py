"""Bounded queues: policies, counters, control items, no hang on stop."""
from __future__ import annotations

import threading

import pytest

from stream.events import StreamReset
from stream.queues import END, BoundedQueue, QueueClosed


def _ctl(x) -> bool:
    return x is END or isinstance(x, StreamReset)


def test_drop_oldest_keeps_newest_and_counts() -> None:
    q = BoundedQueue("q", 3, "drop_oldest", _ctl)
    for i in range(10):
        q.put(i)
    assert [q.get(0.1) for _ in range(3)] == [7, 8, 9]
    assert q.n_dropped == 7 and q.max_depth == 3


def test_drop_newest_keeps_oldest_and_counts() -> None:
    q = BoundedQueue("q", 2, "drop_newest", _ctl)
    kept = [q.put(i) for i in range(5)]
    assert kept == [True, True, False, False, False]
    assert [q.get(0.1), q.get(0.1)] == [0, 1] and q.n_dropped == 3


def test_control_items_are_never_dropped() -> None:
    q = BoundedQueue("q", 2, "drop_oldest", _ctl)
    q.put(1)
    q.put(StreamReset("r"))
    q.put(2)
    q.put(3)
    items = [q.get(0.1) for _ in range(len(q))]
    assert any(isinstance(i, StreamReset) for i in items)


def test_block_waits_for_room_and_keeps_order() -> None:
    q = BoundedQueue("q", 2, "block", _ctl)
    got: list[int] = []

    def consume() -> None:
        for _ in range(100):
            got.append(q.get(5.0))

    t = threading.Thread(target=consume)
    t.start()
    for i in range(100):
        q.put(i)
    t.join(10)
    assert got == list(range(100)) and q.n_dropped == 0 and q.max_depth <= 2


def test_blocked_put_returns_when_stopped() -> None:
    q = BoundedQueue("q", 1, "block", _ctl)
    q.put(0)
    stop = threading.Event()
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(q.put(1, stop)))
    t.start()
    stop.set()
    t.join(2)
    assert not t.is_alive() and result == [False] and q.n_dropped == 1


def test_get_many_stops_at_control_items() -> None:
    q = BoundedQueue("q", 10, "block", _ctl)
    for i in range(3):
        q.put(i)
    q.put(END)
    assert q.get_many(8, 0.1) == [0, 1, 2]
    assert q.get_many(8, 0.1) == [END]


def test_data_next_says_whether_get_many_would_return_data() -> None:
    q = BoundedQueue("q", 10, "block", _ctl)
    assert not q.data_next()
    q.put(1)
    assert q.data_next()
    q.get_many(8, 0.1)
    q.put(END)
    assert not q.data_next()  # a control item is next


def test_closed_queue_refuses_puts_and_get_times_out() -> None:
    q = BoundedQueue("q", 1, "block", _ctl)
    with pytest.raises(TimeoutError):
        q.get(0.01)
    q.close()
    with pytest.raises(QueueClosed):
        q.put(1)


def test_bad_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="policy"):
        BoundedQueue("q", 1, "drop_everything")
