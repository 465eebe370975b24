"""Recycled numpy buffers for per-step outputs (frames, masks).

Why: a fresh array is fresh memory, and on these VMs its page faults cost ~1-2 µs per 4 KiB
page (a 720 KB frame ~150 µs, a 90 KB mask ~50 µs), more than the work that fills it.  A
buffer handed out downstream is reused only once every holder has let go: any view of it
(numpy or ``torch.from_numpy``, on any thread) keeps a reference to the numpy array, so a
reference count back at the pool's own is proof that it is free.  The alternative, a
release call from every consumer, would put the buffer's lifetime into every node's
contract.
"""
from __future__ import annotations

import collections
import sys

import numpy as np


class BufferPool:
    """At most ``max_count`` buffers and ``max_bytes`` in all, of one shape and dtype at a time.

    :meth:`take` returns a free buffer (contents undefined: the caller overwrites all of it)
    or a new one while the bounds allow, else ``None`` (the caller allocates as usual:
    with every buffer in flight, e.g. a consumer behind its queue, nothing is held back).
    A new shape or dtype drops the pool.  Not thread-safe: one producer thread.
    """

    def __init__(self, max_count: int, max_bytes: int) -> None:
        if max_count < 1 or max_bytes < 1:
            raise ValueError(f"max_count={max_count}, max_bytes={max_bytes}: both must be >= 1")
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._bufs: collections.deque[np.ndarray] = collections.deque()  # last handed out at the end

    def take(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray | None:
        bufs = self._bufs
        dt = np.dtype(dtype)
        if bufs and (bufs[0].shape != shape or bufs[0].dtype != dt):
            bufs.clear()
        # Newest first: with a consumer that keeps up, the buffer handed out a few steps ago is
        # free again and still in cache.
        for i in range(len(bufs) - 1, -1, -1):
            buf = bufs[i]
            if sys.getrefcount(buf) <= 3:  # the deque, `buf`, getrefcount's argument
                del bufs[i]
                bufs.append(buf)
                return buf
        nbytes = int(np.prod(shape)) * dt.itemsize
        if len(bufs) < self.max_count and (len(bufs) + 1) * nbytes <= self.max_bytes:
            buf = np.zeros(shape, dtype=dt)
            bufs.append(buf)
            return buf
        return None

    def __len__(self) -> int:
        return len(self._bufs)
