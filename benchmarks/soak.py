"""Soak test (``make soak``; not in CI): the synthetic scene at real time through both sinks.

    python -m benchmarks.soak [--minutes 10] [--bin-us 5000] [--json PATH]

Runs the real pipeline (synthetic source paced to sensor time, the SpikeSEG model, a
ZeroMQ publisher with a subscriber thread reading every message, the overlay writing a
video) for ``--minutes`` and checks, after a warm-up (the first minute, or 20 % of a
shorter run):

* RSS growth < 5 %: ``(mean RSS of the last window - RSS at the end of warm-up) / RSS at
  the end of warm-up``, RSS sampled every 2 s from /proc/self/status;
* no drops at the nominal rate (every queue, the zmq send, and subscriber seq gaps);
* stable latency: p99 of bin close -> mask per window (one per minute, or 5 windows for
  short runs); the last window's p99 must be < 2x the first post-warm-up window's + 5 ms.

Prints a table and writes JSON (default ``runs/soak-YYYYmmdd-HHMMSS.json``); exit 0 when
all checks pass, 1 otherwise.  ``--bin-us`` defaults to 5000 (200 steps/s): a soak is about
drift, not about the peak rate (``benchmarks/bench_e2e.py`` measures that, with 1 ms bins:
since the fourth pass the model keeps up there too, 0-2 % of the bins dropped on 2 cores).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from stream.config import load_config
from stream.engine import Pipeline, new_run_dir
from stream.events import MaskResult
from stream.node import SinkNode
from stream.registry import build_sink, build_source


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status; the soak needs Linux")


class LatencyProbe(SinkNode):
    """Records (wall time, bin close -> this sink in seconds) per mask; nothing else.

    Into a float64 array allocated and written through (its pages resident) before the run:
    the soak measures the pipeline's RSS, and a list of per-mask tuples (~150 B each, ~1.8
    MiB/min at 200 masks/s) was the whole of the steady climb the first soaks reported.
    """

    name = "probe"
    queue_policy = "block"
    queue_capacity = 64

    def __init__(self, capacity: int) -> None:
        self._buf = np.empty((max(1, capacity), 2), np.float64)
        self._buf.fill(0.0)  # touch every page now, not during the run
        self.n = 0

    @property
    def rows(self) -> np.ndarray:
        return self._buf[: self.n]

    def process(self, item: Any) -> None:
        if isinstance(item, MaskResult):
            if self.n == len(self._buf):  # more masks than planned for: grow (RSS jumps once)
                self._buf = np.concatenate([self._buf, np.zeros_like(self._buf)])
            self._buf[self.n] = (time.monotonic(), (time.perf_counter_ns() - item.step.closed_ns) / 1e9)
            self.n += 1


def _subscriber(endpoint: str, stop: threading.Event, out: dict[str, int]) -> None:
    from sinks.subscriber import MaskSubscriber

    with MaskSubscriber(endpoint) as sub:
        while not stop.is_set():
            sub.recv(0.2)
        out.update(received=sub.received, missed=sub.missed, gaps=sub.gaps, rejected=sub.rejected)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="soak length in minutes of sensor (= wall) time")
    ap.add_argument("--bin-us", type=int, default=5000, help="time-step length (default 5000 = 200 steps/s)")
    ap.add_argument("--width", type=int, default=346)
    ap.add_argument("--height", type=int, default=260)
    ap.add_argument("--port", type=int, default=5586, help="zmq port on 127.0.0.1")
    ap.add_argument("--json", default=None, help="output JSON path (default runs/soak-STAMP.json)")
    a = ap.parse_args(argv)
    if not 0 < a.minutes <= 24 * 60:
        print(f"error: --minutes {a.minutes} out of range; use (0, 1440]", file=sys.stderr)
        return 2
    seconds = a.minutes * 60.0
    endpoint = f"tcp://127.0.0.1:{a.port}"
    cfg = load_config(overrides={
        "synthetic": {"width": a.width, "height": a.height, "duration_s": 0.0, "realtime": True},
        "binner": {"bin_us": a.bin_us},
        "engine": {"status_s": 0},
        "zmq": {"wait_subscribers": 1},
    })
    run_dir = new_run_dir(cfg["engine"].runs_dir, "soak")
    probe = LatencyProbe(int(seconds * 1e6 / a.bin_us * 1.1) + 1000)
    sinks = [build_sink(f"zmq:{endpoint}", cfg), build_sink(f"overlay:{run_dir / 'overlay.mp4'}", cfg), probe]
    pipe = Pipeline(cfg, build_source("synthetic", cfg), sinks, duration_s=seconds, run_dir=run_dir)

    stop = threading.Event()
    sub_out: dict[str, int] = {}
    sub = threading.Thread(target=_subscriber, args=(endpoint, stop, sub_out), daemon=True)
    sub.start()
    rss: list[tuple[float, float]] = []

    def sample() -> None:
        while not stop.wait(2.0):
            rss.append((time.monotonic(), rss_mb()))

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.monotonic()
    sampler.start()
    print(f"soak: {a.minutes:g} min, {a.width}x{a.height}, bin {a.bin_us} us, zmq {endpoint} + overlay video; "
          f"run folder {run_dir}", file=sys.stderr, flush=True)
    summary = pipe.run()
    stop.set()
    sampler.join(5)
    sub.join(5)

    warm = min(60.0, 0.2 * seconds)
    n_win = int(round(a.minutes)) if a.minutes >= 5 else 5
    span = (seconds - warm) / n_win
    rows = probe.rows
    r = np.array(rss) if rss else np.zeros((0, 2))
    windows = []
    for k in range(n_win):
        lo, hi = t0 + warm + k * span, t0 + warm + (k + 1) * span
        lat = rows[(rows[:, 0] >= lo) & (rows[:, 0] < hi), 1] if len(rows) else np.zeros(0)
        mem = r[(r[:, 0] >= lo) & (r[:, 0] < hi), 1] if len(r) else np.zeros(0)
        windows.append({
            "t_s": round(lo - t0, 1),
            "masks": int(len(lat)),
            "p50_ms": float(np.percentile(lat, 50) * 1e3) if len(lat) else float("nan"),
            "p99_ms": float(np.percentile(lat, 99) * 1e3) if len(lat) else float("nan"),
            "rss_mb": float(mem.mean()) if len(mem) else float("nan"),
        })
    after_warm = r[r[:, 0] >= t0 + warm, 1] if len(r) else np.zeros(0)
    rss0 = float(after_warm[0]) if len(after_warm) else float("nan")
    growth = (windows[-1]["rss_mb"] - rss0) / rss0 * 100 if rss0 == rss0 else float("nan")
    drops = {k: v for k, v in summary.drops.items() if v}
    counters = summary.stats.get("counters", {})
    zmq_drops = int(counters.get("drops.zmq", 0))
    checks = {
        "rss_growth_lt_5pct": bool(growth < 5.0),
        "no_drops": not drops and zmq_drops == 0 and sub_out.get("missed", 0) == 0,
        "p99_stable": bool(windows[-1]["p99_ms"] < 2 * windows[0]["p99_ms"] + 5.0),
        "run_ok": summary.exit_code == 0,
    }
    report = {
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "minutes": a.minutes, "bin_us": a.bin_us, "size": [a.width, a.height],
        "warmup_s": warm, "rss_after_warmup_mb": rss0, "rss_growth_pct": growth,
        "steps": summary.steps, "masks": summary.masks, "events_in": summary.events_in,
        "drops": drops, "zmq_drops": zmq_drops, "subscriber": sub_out,
        "latency_p50_ms": summary.latency_p50_ms, "latency_p99_ms": summary.latency_p99_ms,
        "windows": windows, "checks": checks, "error": summary.error, "run_dir": str(run_dir),
    }
    out = Path(a.json) if a.json else Path(cfg["engine"].runs_dir) / f"soak-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")

    print(f"{'window t (s)':>12} {'masks':>7} {'p50 ms':>8} {'p99 ms':>8} {'RSS MiB':>8}")
    for w in windows:
        print(f"{w['t_s']:>12.1f} {w['masks']:>7d} {w['p50_ms']:>8.2f} {w['p99_ms']:>8.2f} {w['rss_mb']:>8.1f}")
    print(f"steps {summary.steps}, masks {summary.masks}, drops {drops or 'none'}, zmq drops {zmq_drops}, "
          f"subscriber {sub_out}; RSS after warm-up {rss0:.1f} MiB, growth {growth:+.2f} %")
    print("checks: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in checks.items()))
    print(f"written {out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
