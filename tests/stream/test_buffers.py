"""stream.buffers.BufferPool: reuse only what nobody holds, within its bounds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stream.buffers import BufferPool


def test_reuses_a_buffer_only_after_every_holder_let_go() -> None:
    pool = BufferPool(max_count=4, max_bytes=1 << 20)
    a = pool.take((2, 3), np.float32)
    assert a is not None and a.shape == (2, 3) and a.dtype == np.float32
    view = torch.from_numpy(a)[0]  # a torch view keeps the numpy buffer referenced
    del a
    b = pool.take((2, 3), np.float32)
    assert b is not None and not np.shares_memory(b, view.numpy())
    del view
    c = pool.take((2, 3), np.float32)  # the first buffer is free again: recycled, not new
    assert c is not None and len(pool) == 2
    assert not np.shares_memory(b, c)


def test_bounds_hand_back_none_and_new_shape_starts_over() -> None:
    pool = BufferPool(max_count=2, max_bytes=1 << 20)
    held = [pool.take((4,), np.int64), pool.take((4,), np.int64)]
    assert all(h is not None for h in held)
    assert pool.take((4,), np.int64) is None  # both in flight, count bound reached
    small = BufferPool(max_count=8, max_bytes=100)
    assert small.take((4,), np.int64) is not None  # 32 bytes
    assert small.take((20,), np.int64) is None  # 160 bytes: over the byte bound
    assert pool.take((5,), np.int64) is not None and len(pool) == 1  # new shape: old ones dropped
    assert pool.take((5,), np.uint8) is not None and len(pool) == 1  # new dtype too


def test_bad_bounds_are_loud() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        BufferPool(0, 10)
