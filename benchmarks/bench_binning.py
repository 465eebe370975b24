"""(a) Binning throughput in events/s, for 1 M and 10 M events at 346x260 and 1280x720.

Two figures per case:

* ``kernel``: :func:`stream.binner.bin_events`, the counting pass over the structured
  array (events spread over 10 bins of 1 ms: the frames, 10 x 2 x H x W float32, fit in
  memory at every size).  This is the figure the 50 Mev/s target is checked against.
* ``Binner``: :class:`stream.binner.Binner` fed 1 ms packets of a stream at 10 Mev/s of
  sensor time (a busy HD sensor), so each packet closes one bin: cleaning, splitting,
  zeroing the frame of every bin and building the :class:`Step` are all included.  At
  1280x720 zeroing the 7.4 MB frame of every 1 ms bin costs about as much as counting
  10,000 events, which this row makes visible.  Since 2026-11-25 the Binner recycles a
  frame once nothing references it (``Binner._frame_buffer``); the steps here are
  dropped at once, as by a model that keeps up, so the row measures recycled frames
  (cleared, not page-faulted) -- what the engine gets when the model keeps up.  Rows
  from before that date measured a fresh frame per bin.
"""
from __future__ import annotations

import numpy as np

from stream.binner import Binner, BinnerConfig, bin_events
from stream.config import build
from stream.events import EventPacket, SensorSize, make_events

from .common import BenchSettings, Results, Row, measure_rate

SIZES = (SensorSize(346, 260), SensorSize(1280, 720))
COUNTS = (1_000_000, 10_000_000)
TARGET_MEVS = 50.0


def random_events(n: int, size: SensorSize, duration_us: int, seed: int = 0) -> np.ndarray:
    """``n`` uniformly placed events, sorted timestamps over ``[0, duration_us)``."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, duration_us, n, dtype=np.int64))
    return make_events(t, rng.integers(0, size.width, n), rng.integers(0, size.height, n), rng.integers(0, 2, n))


def _packets(ev: np.ndarray, size: SensorSize, packet_us: int) -> list[EventPacket]:
    t = ev["timestamp"]
    edges = np.arange(int(t[0]), int(t[-1]) + packet_us + 1, packet_us, dtype=np.int64)
    cuts = np.searchsorted(t, edges)
    return [EventPacket(ev[a:b], size) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def run(results: Results, settings: BenchSettings) -> None:
    counts = (20_000, 200_000) if settings.tiny else COUNTS
    cfg = build(BinnerConfig, {"bin_us": 1000})
    for size in SIZES:
        for n in counts:
            label = f"{n / 1e6:g}M ev @{size}"
            # kernel: all events in 10 bins of 1 ms
            ev = random_events(n, size, 10_000)

            def kernel(ev: np.ndarray = ev, size: SensorSize = size) -> float:
                bin_events(ev, 0, 1000, 10, 2, size.height, size.width)
                return len(ev)

            st = measure_rate(kernel, settings)
            results.add(Row("a binning", f"kernel {label}", _mev(st), "Mev/s", f">= {TARGET_MEVS:g}", TARGET_MEVS))
            # Binner at 10 Mev/s sensor rate, 1 ms packets (one bin closes per packet)
            ev2 = random_events(n, size, max(n // 10, 2000), seed=1)
            pkts = _packets(ev2, size, 1000)

            def binner(pkts: list[EventPacket] = pkts, size: SensorSize = size) -> float:
                b = Binner(cfg, size)
                k = 0
                for p in pkts:
                    k += len(b.process(p))
                k += len(b.flush())
                return sum(len(p) for p in pkts)

            st2 = measure_rate(binner, _fewer(settings, n))
            results.add(
                Row("a binning", f"Binner 1ms bins, 10 Mev/s {label}", _mev(st2), "Mev/s",
                    extra={"bins": len(pkts), "frame_mb": 2 * size.width * size.height * 4 / 1e6})
            )


def _fewer(settings: BenchSettings, n: int) -> BenchSettings:
    """10 M events through the Binner at HD zero 7 GB of frames: 3 repeats are enough."""
    if n >= 10_000_000 and settings.repeats > 3:
        return BenchSettings(repeats=3, warmup=settings.warmup, tiny=settings.tiny, device=settings.device)
    return settings


def _mev(st):  # type: ignore[no-untyped-def]
    from .common import Stat

    return Stat(st.median / 1e6, st.min / 1e6, st.max / 1e6, st.n)
