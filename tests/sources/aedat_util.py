"""Write small ``.aedat4`` recordings in tests, through dv-processing's own writer.

Shared by the tests of every package that needs a real recording: the files are
produced by ``dv.io.MonoCameraWriter`` (never hand-assembled bytes), so the reader
under test sees exactly what DV software would write.

dv-processing 2.0.4 has no numpy -> ``EventStore`` constructor, so stores are filled
with ``push_back`` (about 1 M events/s: fine for test-sized files).
"""
from __future__ import annotations

from pathlib import Path

import dv_processing as dv
import numpy as np

from stream.events import EVENT_DTYPE, SensorSize, as_events, make_events


def to_store(events: np.ndarray) -> dv.EventStore:
    """An ``EventStore`` holding a copy of ``events`` (any event array layout)."""
    ev = as_events(events)
    store = dv.EventStore()
    for t, x, y, p in zip(
        ev["timestamp"].tolist(), ev["x"].tolist(), ev["y"].tolist(), ev["polarity"].tolist()
    ):
        store.push_back(t, x, y, bool(p))
    return store


def write_aedat4(
    path: str | Path,
    events: np.ndarray,
    size: SensorSize | tuple[int, int],
    batch: int = 1000,
    camera: str = "TEST_DVS",
) -> Path:
    """Write ``events`` (time-sorted) as an events-only ``.aedat4`` file.

    Events go out in packets of ``batch`` events, so the reader sees ``ceil(n / batch)``
    batches.  An empty ``events`` writes a file whose event stream holds no events.
    Returns the path.
    """
    path = Path(path)
    w, h = (size.width, size.height) if isinstance(size, SensorSize) else size
    cfg = dv.io.MonoCameraWriter.EventOnlyConfig(camera, (int(w), int(h)))
    writer = dv.io.MonoCameraWriter(str(path), cfg)
    ev = as_events(events)
    for i in range(0, len(ev), max(1, int(batch))):
        writer.writeEvents(to_store(ev[i : i + batch]))
    del writer  # the destructor flushes and writes the file's index table
    return path


def write_frames_only(path: str | Path, size: tuple[int, int] = (64, 48), n_frames: int = 3) -> Path:
    """A recording with a frame stream and no event stream."""
    path = Path(path)
    cfg = dv.io.MonoCameraWriter.FrameOnlyConfig("TEST_APS", (int(size[0]), int(size[1])))
    writer = dv.io.MonoCameraWriter(str(path), cfg)
    for k in range(n_frames):
        img = np.full((size[1], size[0]), 10 * k, dtype=np.uint8)
        writer.writeFrame(dv.Frame(1_000 + 10_000 * k, img))
    del writer
    return path


def write_imu_only(path: str | Path, n: int = 20) -> Path:
    """A recording with an IMU stream and no event stream."""
    path = Path(path)
    cfg = dv.io.MonoCameraWriter.Config("TEST_IMU")
    cfg.addImuStream()
    writer = dv.io.MonoCameraWriter(str(path), cfg)
    for k in range(n):
        writer.writeImu(dv.data.generate.levelImuMeasurement(1_000 + 1_000 * k))
    del writer
    return path


def random_events(
    n: int,
    size: tuple[int, int],
    t0_us: int = 1_000_000,
    span_us: int = 1_000_000,
    seed: int = 0,
) -> np.ndarray:
    """``n`` uniformly placed events, sorted in time over ``[t0, t0 + span)``."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(t0_us, t0_us + span_us, n))
    return make_events(t, rng.integers(0, size[0], n), rng.integers(0, size[1], n), rng.integers(0, 2, n))


def concat(chunks: list[np.ndarray]) -> np.ndarray:
    """Concatenate event arrays keeping :data:`EVENT_DTYPE` (np.concatenate drops its padding)."""
    out = np.zeros(sum(len(c) for c in chunks), dtype=EVENT_DTYPE)
    i = 0
    for c in chunks:
        out[i : i + len(c)] = c
        i += len(c)
    return out
