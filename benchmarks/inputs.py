"""Benchmark inputs: the built-in scene, uniform noise, real recordings, all as binned Steps.

Inputs are binned *before* timing (binning has its own benchmark), so a model figure
is the model alone.  Every generator is seeded: two runs see the same events.

The scene comes from the registered ``synthetic`` source (``sources/synthetic.py``).
While that source is not available the bench falls back to :func:`fallback_scene_events`
(moving rectangles and discs whose edges emit events, plus 0.05 % background noise) and
says so in the results; the fallback is PERF-NOTES' "realistic moving-object scene".
"""
from __future__ import annotations

import glob
import os
import threading
from pathlib import Path

import numpy as np

from stream.binner import Binner, BinnerConfig
from stream.config import Config, build
from stream.events import EVENT_DTYPE, EventPacket, SensorSize, Step, StreamReset, make_events

#: ``../shared/data/real`` next to the checkout; ``SPIKESTREAM_REAL_DIR`` overrides it (machines
#: where the shared folder lives elsewhere).
REAL_DIR = Path(
    os.environ.get("SPIKESTREAM_REAL_DIR") or Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "real"
)


def parse_size(text: str) -> SensorSize:
    """``WIDTHxHEIGHT`` (e.g. ``346x260``) as a :class:`SensorSize`; ``ValueError`` with a one-line
    reason otherwise (the model needs width and height >= 4)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{text!r} is not WIDTHxHEIGHT; use e.g. 346x260") from None
    if w < 4 or h < 4:
        raise ValueError(f"{text!r} is too small; width and height must be >= 4")
    return SensorSize(w, h)


def bin_steps(events: np.ndarray, size: SensorSize, bin_us: int = 1000, labels: np.ndarray | None = None) -> list[Step]:
    """All steps of ``events`` (sorted) with 1-ms bins, empty bins included, on CPU."""
    b = Binner(build(BinnerConfig, {"bin_us": bin_us}), size)
    out = [s for s in b.process(EventPacket(events, size, labels=labels)) if isinstance(s, Step)]
    out += b.flush()
    return out


def noise_events(size: SensorSize, density: float, n_steps: int, bin_us: int = 1000, seed: int = 0) -> np.ndarray:
    """Uniform noise: each bin holds ``round(density * W * H)`` events at distinct random pixels."""
    rng = np.random.default_rng(seed)
    npx = size.width * size.height
    k = max(1, int(round(density * npx)))
    parts = []
    for i in range(n_steps):
        flat = rng.choice(npx, size=k, replace=False)
        t = np.sort(rng.integers(i * bin_us, (i + 1) * bin_us, k, dtype=np.int64))
        parts.append(make_events(t, flat % size.width, flat // size.width, rng.integers(0, 2, k)))
    return np.concatenate(parts, dtype=EVENT_DTYPE)


def fallback_scene_events(size: SensorSize, n_steps: int, bin_us: int = 1000, seed: int = 0) -> np.ndarray:
    """Moving shapes: events where the occupancy changed between bins (ON leading, OFF trailing).

    Four objects of 6-15 % of the sensor height move at 0.02-0.06 px/µs-ms scale (a few
    pixels per millisecond at most), plus 0.05 % uniform noise per bin.
    """
    rng = np.random.default_rng(seed)
    w, h = size.width, size.height
    yy, xx = np.mgrid[0:h, 0:w]
    objs = []
    for j in range(4):
        r = max(3, int(h * rng.uniform(0.06, 0.15)))
        objs.append(
            dict(
                x=rng.uniform(r, w - r), y=rng.uniform(r, h - r), r=r,
                vx=rng.uniform(0.3, 1.0) * rng.choice([-1, 1]), vy=rng.uniform(0.2, 0.6) * rng.choice([-1, 1]),
                disc=bool(j % 2),
            )
        )

    def occupancy() -> np.ndarray:
        occ = np.zeros((h, w), bool)
        for o in objs:
            if o["disc"]:
                occ |= (xx - o["x"]) ** 2 + (yy - o["y"]) ** 2 <= o["r"] ** 2
            else:
                occ |= (np.abs(xx - o["x"]) <= o["r"]) & (np.abs(yy - o["y"]) <= o["r"] * 0.6)
        return occ

    prev = occupancy()
    parts = []
    for i in range(n_steps):
        for o in objs:
            o["x"] += o["vx"]
            o["y"] += o["vy"]
            if not o["r"] <= o["x"] <= w - o["r"]:
                o["vx"] = -o["vx"]
            if not o["r"] <= o["y"] <= h - o["r"]:
                o["vy"] = -o["vy"]
        occ = occupancy()
        on_y, on_x = np.nonzero(occ & ~prev)
        off_y, off_x = np.nonzero(prev & ~occ)
        nn = max(1, int(0.0005 * w * h))
        nx, ny = rng.integers(0, w, nn), rng.integers(0, h, nn)
        x = np.concatenate([on_x, off_x, nx])
        y = np.concatenate([on_y, off_y, ny])
        p = np.concatenate([np.ones(len(on_x), int), np.zeros(len(off_x), int), rng.integers(0, 2, nn)])
        t = np.sort(rng.integers(i * bin_us, (i + 1) * bin_us, len(x), dtype=np.int64))
        parts.append(make_events(t, x, y, p))
        prev = occ
    return np.concatenate(parts, dtype=EVENT_DTYPE)


def scene_events(cfg: Config, size: SensorSize, n_steps: int, bin_us: int = 1000) -> tuple[np.ndarray, str]:
    """``n_steps`` bins of the built-in scene at ``size``; returns (events, which scene).

    Uses the registered ``synthetic`` source when it can be built at this size (its config
    section must take ``width``/``height``), else :func:`fallback_scene_events`.
    """
    src = _synthetic_source(cfg, size)
    if src is None:
        return fallback_scene_events(size, n_steps, bin_us), "fallback moving shapes (sources/synthetic.py not ready)"
    from stream.metrics import Metrics
    from stream.node import RunContext

    stop = threading.Event()
    src.open(RunContext(stop=stop, metrics=Metrics()))
    try:
        parts = []
        t_first = None
        for item in src.packets():
            if isinstance(item, StreamReset) or not len(item.events):
                continue
            ev = item.events
            if t_first is None:
                t_first = int(ev["timestamp"][0])
            parts.append(ev)
            if int(ev["timestamp"][-1]) - t_first >= n_steps * bin_us:
                break
    finally:
        stop.set()
        src.close()
    if not parts:
        return fallback_scene_events(size, n_steps, bin_us), "fallback moving shapes (synthetic source gave no events)"
    ev = np.concatenate(parts, dtype=EVENT_DTYPE)
    ev = ev[ev["timestamp"] < t_first + n_steps * bin_us]
    return ev, "built-in synthetic scene"


def _synthetic_source(cfg: Config, size: SensorSize):  # type: ignore[no-untyped-def]
    """The synthetic source at ``size`` if the package provides one, else None (reported by the caller)."""
    from stream.registry import SOURCES, load_plugins

    load_plugins()
    if "synthetic" not in SOURCES or "synthetic" not in cfg:
        return None
    sec = cfg["synthetic"]
    fields = getattr(sec, "__dataclass_fields__", {})
    changes = {}
    if "width" in fields and "height" in fields:
        changes = {"width": size.width, "height": size.height}
    elif "size" in fields:
        changes = {"size": (size.width, size.height)}
    else:
        return None
    if "realtime" in fields:
        changes["realtime"] = False
    c2 = cfg.replace("synthetic", **changes)
    return SOURCES["synthetic"].factory(None, c2)


def real_recordings() -> list[Path]:
    """The shared real recordings (``../shared/data/real/*.aedat4``), [] when absent."""
    if not REAL_DIR.is_dir():
        return []
    return [Path(p) for p in sorted(glob.glob(str(REAL_DIR / "*.aedat4")))]


def read_aedat4(path: Path, max_us: int, skip_us: int = 0) -> tuple[np.ndarray, SensorSize]:
    """Events of ``path`` from ``skip_us`` after the first event, at most ``max_us`` long."""
    import dv_processing as dv

    rec = dv.io.MonoCameraRecording(str(path))
    if not rec.isEventStreamAvailable():
        raise ValueError(f"{path} has no event stream")
    res = rec.getEventResolution()
    size = SensorSize(int(res[0]), int(res[1]))
    parts: list[np.ndarray] = []
    t_first = None
    while rec.isRunning():
        batch = rec.getNextEventBatch()
        if batch is None:
            break
        if batch.size() == 0:
            continue
        ev = batch.numpy()
        if t_first is None:
            t_first = int(ev["timestamp"][0])
        # same layout as EVENT_DTYPE (dv-processing's own), but a distinct dtype object: view, then copy
        # out of dv's buffer, which the next batch may reuse
        parts.append(np.array(np.asarray(ev).view(EVENT_DTYPE)))
        if int(ev["timestamp"][-1]) - t_first >= skip_us + max_us:
            break
    if not parts:
        raise ValueError(f"{path} holds no events")
    ev = np.concatenate(parts, dtype=EVENT_DTYPE)  # without dtype numpy packs the padded layout (itemsize 13)
    t = ev["timestamp"]
    ev = ev[(t >= t_first + skip_us) & (t < t_first + skip_us + max_us)]
    return ev, size
