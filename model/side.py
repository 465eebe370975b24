"""Helper threads for compiled kernels that release the GIL (numba ``nogil=True``).

The event-driven path decodes a step's mask and its per-spike supports (HULK) with
independent kernels that only read the step's pooling lists.  :class:`SideThreads` runs
some of those jobs on ``n - 1`` persistent helper threads while the calling thread runs
the first one, then waits for all of them: a fork/join per step with a ~10-30 us hand-off
(one ``SimpleQueue`` put/get per job), against ~0.2-0.7 ms per decode job at 346x260.

A job must not touch state another job writes (each decode job gets its own scratch).
An exception in a helper job is re-raised in the caller by :meth:`run`.  Threads are
daemons, started lazily on the first :meth:`run` and stopped by :meth:`close` (the node
calls it from its ``close``); a closed instance starts them again when used.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable

Job = Callable[[], Any]
_STOP = object()


class SideThreads:
    """``n`` - 1 helper threads (``n`` = 1: every job runs in the caller, in order)."""

    def __init__(self, n: int) -> None:
        if not (1 <= n <= 64):
            raise ValueError(f"threads={n} is not allowed; use 1..64")
        self.n = n
        self._inbox: list[queue.SimpleQueue[Any]] = []
        self._done: queue.SimpleQueue[tuple[int, bool, Any]] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def _start(self) -> None:
        for i in range(self.n - 1):
            q: queue.SimpleQueue[Any] = queue.SimpleQueue()
            th = threading.Thread(target=self._loop, args=(q,), name=f"spikestream-side-{i}", daemon=True)
            self._inbox.append(q)
            self._threads.append(th)
            th.start()

    def _loop(self, inbox: queue.SimpleQueue[Any]) -> None:
        while True:
            item = inbox.get()
            if item is _STOP:
                return
            k, job = item
            try:
                self._done.put((k, True, job()))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, re-raised there
                self._done.put((k, False, e))

    def run(self, jobs: list[Job]) -> list[Any]:
        """Run ``jobs`` (job 0 in the calling thread, the others on helpers); their results in order."""
        if not jobs:
            return []
        if self.n == 1 or len(jobs) == 1:
            return [job() for job in jobs]
        if not self._threads:
            self._start()
        results: list[Any] = [None] * len(jobs)
        # jobs beyond the helpers' count queue up behind the earlier ones
        for k in range(1, len(jobs)):
            self._inbox[(k - 1) % len(self._inbox)].put((k, jobs[k]))
        first_error: BaseException | None = None
        try:
            results[0] = jobs[0]()
        except BaseException as e:  # noqa: BLE001 - re-raised after the helpers finished
            first_error = e
        for _ in range(len(jobs) - 1):
            k, ok, value = self._done.get()
            if ok:
                results[k] = value
            elif first_error is None:
                first_error = value
        if first_error is not None:
            raise first_error
        return results

    def close(self) -> None:
        """Stop and join the helper threads (idempotent)."""
        for q in self._inbox:
            q.put(_STOP)
        for th in self._threads:
            th.join(timeout=5.0)
        self._inbox.clear()
        self._threads.clear()


class Overlap:
    """One persistent helper thread that runs jobs in submission order while the caller goes on.

    The node's two-stage pipeline over a micro-batch: the model thread encodes step t + 1 while
    the helper runs step t's HULK-SMASH.  :meth:`submit` queues a job and returns at once;
    :meth:`result` waits for the oldest unfinished job and returns its value, or re-raises its
    exception in the caller.  Each job must only touch what no concurrent code writes (the
    node gives it a bank of pooling lists and decode scratch of its own).  A ``SimpleQueue``
    hand-off costs ~10-30 us against ~0.4 ms of work per job at 346x260.
    """

    def __init__(self) -> None:
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.pending = 0

    def _loop(self) -> None:
        while True:
            job = self._inbox.get()
            if job is _STOP:
                return
            try:
                self._done.put((True, job()))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, re-raised there
                self._done.put((False, e))

    def submit(self, job: Job) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="spikestream-overlap", daemon=True)
            self._thread.start()
        self._inbox.put(job)
        self.pending += 1

    def result(self) -> Any:
        """The oldest pending job's value (waits for it); its exception is raised here."""
        if self.pending == 0:
            raise RuntimeError("Overlap.result() without a pending job")
        ok, value = self._done.get()
        self.pending -= 1
        if not ok:
            raise value
        return value

    def drain(self) -> None:
        """Wait for every pending job, dropping results and exceptions (cleanup after an error)."""
        while self.pending:
            self._done.get()
            self.pending -= 1

    def close(self) -> None:
        """Finish pending jobs, stop and join the thread (idempotent)."""
        self.drain()
        if self._thread is not None:
            self._inbox.put(_STOP)
            self._thread.join(timeout=5.0)
            self._thread = None
