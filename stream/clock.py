"""Wall clocks, injectable so that pacing maths is tested without wall time.

``Clock.now()`` returns seconds (monotonic); ``Clock.sleep_until(t, stop)`` waits until
``now() >= t`` or ``stop`` is set.  :class:`FakeClock` advances only when told (or when
slept on), so a test of real-time replay runs instantly and exactly.
"""
from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep_until(self, t: float, stop: threading.Event | None = None) -> None: ...


class WallClock:
    """``time.monotonic`` with stop-aware sleeping (never sleeps more than 50 ms at a time)."""

    def now(self) -> float:
        return time.monotonic()

    def sleep_until(self, t: float, stop: threading.Event | None = None) -> None:
        while True:
            dt = t - time.monotonic()
            if dt <= 0 or (stop is not None and stop.is_set()):
                return
            if stop is not None:
                stop.wait(min(dt, 0.05))
            else:
                time.sleep(min(dt, 0.05))


class FakeClock:
    """A clock that moves only by ``advance`` or ``sleep_until`` (which jumps to ``t``)."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = float(start)
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt

    def sleep_until(self, t: float, stop: threading.Event | None = None) -> None:
        if t > self.t:
            self.sleeps.append(t - self.t)
            self.t = t
