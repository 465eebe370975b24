"""Run metrics: counters, gauges, latency percentiles, queue stats, and the status line.

Thread-safe and cheap on the hot path (a lock and a dict update).  Latencies keep the
most recent ``window`` samples per key (a bounded deque, so a long run never grows
memory) plus exact running max and count.  Rates are computed between two calls of
:meth:`Metrics.tick` (the status printer calls it once a second) and overall since start.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any

import numpy as np


class Metrics:
    def __init__(self, window: int = 20000) -> None:
        self._lock = threading.Lock()
        self.counters: dict[str, float] = collections.defaultdict(float)
        self.gauges: dict[str, float] = {}
        self._lat: dict[str, collections.deque[float]] = {}
        self._lat_max: dict[str, float] = collections.defaultdict(float)
        self._lat_n: dict[str, int] = collections.defaultdict(int)
        self._window = window
        self._queues: list[Any] = []
        self.t_start = time.monotonic()
        self._last_tick = (self.t_start, {})
        self._rates: dict[str, float] = {}

    # -- hot path ---------------------------------------------------------------------
    def inc(self, key: str, n: float = 1) -> None:
        with self._lock:
            self.counters[key] += n

    def gauge(self, key: str, value: float) -> None:
        with self._lock:
            self.gauges[key] = float(value)

    def latency(self, key: str, seconds: float) -> None:
        with self._lock:
            d = self._lat.get(key)
            if d is None:
                d = self._lat[key] = collections.deque(maxlen=self._window)
            d.append(seconds)
            self._lat_n[key] += 1
            if seconds > self._lat_max[key]:
                self._lat_max[key] = seconds

    def register_queue(self, q: Any) -> None:
        self._queues.append(q)

    # -- reading ----------------------------------------------------------------------
    def latency_stats(self, key: str) -> dict[str, float]:
        with self._lock:
            d = self._lat.get(key)
            if not d:
                return {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
            arr = np.fromiter(d, dtype=np.float64, count=len(d))
            n, mx = self._lat_n[key], self._lat_max[key]
        p50, p99 = np.percentile(arr, [50, 99])
        return {"n": n, "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3, "max_ms": mx * 1e3}

    def tick(self) -> dict[str, float]:
        """Update and return per-second rates of every counter since the last tick."""
        now = time.monotonic()
        with self._lock:
            counters = dict(self.counters)
        t_prev, prev = self._last_tick
        dt = max(now - t_prev, 1e-9)
        self._rates = {k: (v - prev.get(k, 0.0)) / dt for k, v in counters.items()}
        self._last_tick = (now, counters)
        return dict(self._rates)

    def snapshot(self) -> dict[str, Any]:
        """Everything, as plain JSON-able types."""
        elapsed = time.monotonic() - self.t_start
        with self._lock:
            counters = dict(self.counters)
            gauges = dict(self.gauges)
            lat_keys = list(self._lat)
        out: dict[str, Any] = {
            "elapsed_s": elapsed,
            "counters": counters,
            "gauges": gauges,
            "rates": dict(self._rates),
            "mean_rates": {k: v / max(elapsed, 1e-9) for k, v in counters.items()},
            "latency": {k: self.latency_stats(k) for k in lat_keys},
            "queues": {q.name: q.stats() for q in self._queues},
        }
        return out

    def drops_total(self) -> int:
        with self._lock:
            from_counters = sum(v for k, v in self.counters.items() if k.startswith("drops."))
        return int(from_counters + sum(q.n_dropped for q in self._queues))

    def status_line(self) -> str:
        r = self._rates
        lat = self.latency_stats("latency.e2e")
        qs = " ".join(f"{q.name} {len(q)}/{q.capacity}" for q in self._queues)
        with self._lock:
            t_sensor = self.gauges.get("sensor_time_s", float("nan"))
        parts = [
            f"t={t_sensor:7.2f}s",
            f"{r.get('events_in', 0.0) / 1e3:8.1f} kev/s",
            f"{r.get('steps', 0.0):7.0f} steps/s",
            f"{r.get('masks', 0.0):7.0f} masks/s",
            f"lat p50 {lat['p50_ms']:.2f} p99 {lat['p99_ms']:.2f} ms",
            f"queues {qs}",
            f"drops {self.drops_total()}",
        ]
        if "adapt.updates" in r:
            parts.append(f"adapt {r.get('adapt.updates', 0.0):.1f} upd/s C_l {self.gauges.get('adapt.c_l', float('nan')):.4f}")
        return " | ".join(parts)
