"""aedat4 recorder: files read back by dv-processing equal the input events and masks."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import dv_processing as dv
import numpy as np
import pytest

from sinks.recorder import Recorder, RecordConfig, events_to_store
from stream.config import Config, build
from stream.events import EVENT_DTYPE, MaskResult, SensorSize, Step, StreamReset, make_events
from stream.metrics import Metrics
from stream.node import NodeError, RunContext, UsageError
from stream.registry import SINKS

W, H, BIN = 64, 48, 5_000


def _steps(n: int, seed: int = 0, t_start: int = 1_000_000) -> list[MaskResult]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t0 = t_start + i * BIN
        k = int(rng.integers(0, 300)) if i != 2 else 0  # step 2 is empty
        ev = make_events(np.sort(rng.integers(t0, t0 + BIN, k)), rng.integers(0, W, k), rng.integers(0, H, k),
                         rng.integers(0, 2, k))
        mask = np.zeros((H, W), np.uint8)
        mask[i % H, :] = 1
        mask[:, i % W] = 3
        step = Step(i, t0, t0 + BIN, None, ev, SensorSize(W, H), time.perf_counter_ns(), source="t")
        out.append(MaskResult(step, mask))
    return out


def _ctx(run_dir: Path | None = None) -> RunContext:
    return RunContext(stop=threading.Event(), metrics=Metrics(), run_dir=run_dir)


def _read(path: Path) -> tuple[np.ndarray, list[tuple[int, np.ndarray]], dict]:
    rec = dv.io.MonoCameraRecording(str(path))
    assert rec.getEventResolution() == (W, H) and rec.getFrameResolution() == (W, H)
    batches = []
    while (b := rec.getNextEventBatch()) is not None:
        arr = b.numpy()
        assert arr.dtype == EVENT_DTYPE  # dv-processing's layout is the project's layout
        batches.append(arr)
    frames = []
    while (f := rec.getNextFrame()) is not None:
        frames.append((f.timestamp, f.image.copy()))
    meta = rec.getStreamMetadata("frames")
    events = np.concatenate(batches) if batches else np.zeros(0, EVENT_DTYPE)
    return events, frames, meta


def _record(path: Path, results: list, **cfg) -> Recorder:
    r = Recorder(build(RecordConfig, cfg), path, n_classes=3)
    r.open(_ctx())
    try:
        for item in results:
            r.process(item)
    finally:
        r.close()
    return r


def test_events_and_masks_read_back_exactly(tmp_path: Path) -> None:
    results = _steps(20)
    path = tmp_path / "run.aedat4"
    rec = _record(path, results)
    assert rec.scale == 85  # 255 // 3 classes
    events, frames, meta = _read(path)
    expected = np.concatenate([r.step.events for r in results])
    np.testing.assert_array_equal(events, expected)
    assert meta["maskScale"] == "85"
    assert [t for t, _ in frames] == [r.step.t0_us for r in results]  # stamped at bin start
    for (_, img), r in zip(frames, results):
        assert img.shape == (H, W) and img.dtype == np.uint8
        np.testing.assert_array_equal(img // 85, r.mask)


def test_reset_rewinding_time_is_shifted_to_stay_monotonic(tmp_path: Path) -> None:
    first, second = _steps(3, seed=1), _steps(3, seed=2)  # same sensor times twice (a loop)
    path = tmp_path / "loop.aedat4"
    _record(path, [*first, StreamReset("loop"), *second], mask_scale=1)
    events, frames, _ = _read(path)
    shift = first[-1].step.t1_us - second[0].step.t0_us
    np.testing.assert_array_equal(events["timestamp"][: sum(len(r.step.events) for r in first)],
                                  np.concatenate([r.step.events["timestamp"] for r in first]))
    assert [t for t, _ in frames] == [r.step.t0_us for r in first] + [r.step.t0_us + shift for r in second]
    assert np.all(np.diff(events["timestamp"]) >= 0)
    np.testing.assert_array_equal(frames[4][1], second[1].mask)


def test_file_is_readable_after_an_error(tmp_path: Path) -> None:
    results = _steps(4)
    bad = _steps(1)[0]
    bad.mask = np.full((H, W), 9, np.uint8)  # 9 x 85 > 255
    path = tmp_path / "err.aedat4"
    with pytest.raises(NodeError, match="exceeds 255; set record.mask_scale <= 28"):
        _record(path, [*results, bad])
    events, frames, _ = _read(path)
    assert len(frames) == 4
    np.testing.assert_array_equal(events, np.concatenate([r.step.events for r in results]))


def test_never_overwrites_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "x.aedat4"
    path.write_bytes(b"precious")
    r = Recorder(RecordConfig(), path)
    with pytest.raises(NodeError) as ei:
        r.open(_ctx())
    assert str(ei.value) == f"{path} exists; pass --overwrite (record.overwrite: true) to replace it, or pick another path"
    r.close()
    assert path.read_bytes() == b"precious"
    _record(path, _steps(2), overwrite=True)
    assert len(_read(path)[1]) == 2


def test_bare_record_writes_into_the_run_folder(tmp_path: Path) -> None:
    make = SINKS["record"].factory
    r = make(None, Config({"record": RecordConfig()}))
    r.open(_ctx(tmp_path))
    res = _steps(1)[0]
    res.mask = (res.mask > 0).astype(np.uint8)  # one class: grey value 255
    r.process(res)
    r.close()
    r.close()  # idempotent
    assert r.scale == 255
    np.testing.assert_array_equal(_read(tmp_path / "record.aedat4")[1][0][1], res.mask * 255)


def test_bad_paths_and_config() -> None:
    with pytest.raises(UsageError, match="must end with .aedat4"):
        Recorder(RecordConfig(), "out.mp4")
    with pytest.raises(UsageError):
        build(RecordConfig, {"mask_scale": 300})
    r = Recorder(RecordConfig(), "/nonexistent-dir/x.aedat4")
    with pytest.raises(NodeError, match="does not exist"):
        r.open(_ctx())


def test_events_to_store_is_exact_with_offset() -> None:
    ev = make_events([5, 6, 9], [1, 2, 3], [4, 5, 6], [1, 0, 1])
    np.testing.assert_array_equal(events_to_store(ev).numpy(), ev)
    shifted = events_to_store(ev, 100).numpy()
    assert list(shifted["timestamp"]) == [105, 106, 109] and list(ev["timestamp"]) == [5, 6, 9]  # input untouched
    assert len(events_to_store(ev[:0])) == 0
