"""Catalogue 1, inputs: broken, strange and extreme recordings through the real CLI.

Each case: the exit code (0 ok, 1 runtime failure, 2 usage error), one ``error:`` line and
no traceback, no hang (every run has a timeout), and the outputs written so far intact
(the overlay video still decodes).  Recordings are written by dv-processing in the test.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stream.events import make_events
from tests.reliability.util import cli, small_cfg, video_frames
from tests.sources.aedat_util import random_events, write_aedat4, write_frames_only

SIZE = (64, 48)
N = 20_000


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    d = tmp_path_factory.mktemp("rec")
    ev = random_events(N, SIZE, span_us=200_000, seed=1)
    return write_aedat4(d / "good.aedat4", ev, SIZE, batch=1000), ev


def _run(tmp: Path, source: Path | str, *extra: str, timeout: float = 60) -> tuple:
    cfg = small_cfg(tmp, replay={"read_timeout_s": 1.0})
    video = tmp / "out.mp4"
    stats = tmp / "stats.json"
    r = cli(["-c", str(cfg), "--source", str(source), "--sink", f"overlay:{video}", "--stats-json", str(stats), *extra],
            tmp, timeout=timeout)
    data = json.loads(stats.read_text()) if stats.exists() else None
    return r, video, data


@pytest.mark.parametrize(
    "case, rc, needle",
    [
        ("missing", 2, "not found"),
        ("empty_dir", 2, "holds no .aedat4 file"),
        ("empty", 1, "cannot open"),
        ("truncated", 1, "truncated"),
        ("not_aedat4", 1, "cannot open"),
        ("no_event_stream", 1, "has no event stream"),
    ],
)
def test_unreadable_input_is_one_line_and_right_code(tmp_path: Path, good, case: str, rc: int, needle: str) -> None:
    path, _ = good
    data = path.read_bytes()
    src = tmp_path / f"{case}.aedat4"
    if case == "empty_dir":
        src = tmp_path / "recs"
        src.mkdir()
    elif case == "empty":
        src.write_bytes(b"")
    elif case == "truncated":
        src.write_bytes(data[: len(data) // 2])  # mid-packet: the cut lands inside a packet
    elif case == "not_aedat4":
        src.write_bytes(b"this is not a recording\n" * 200)
    elif case == "no_event_stream":
        write_frames_only(src)
    r, video, _ = _run(tmp_path, src)
    assert r.rc == rc, r.stderr
    line = r.one_error()
    assert needle in line, line
    assert str(src.name) in line or str(src) in line, line  # the message names the input
    assert not video.exists()  # nothing half-written for an input that never opened


def test_flipped_bytes_end_with_one_line_not_a_hang(tmp_path: Path, good) -> None:
    """dv-processing has no checksums: flipped bytes decode as garbage or make it spin.
    Either way the run ends (read_timeout_s = 1 here) with one line naming the file, and
    the video of the steps before the damage is playable."""
    path, _ = good
    raw = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.integers(len(raw) // 4, 3 * len(raw) // 4, 20):
        raw[i] ^= 0xFF
    src = tmp_path / "flipped.aedat4"
    src.write_bytes(bytes(raw))
    r, video, _ = _run(tmp_path, src, timeout=60)
    assert r.rc == 1, r.stderr
    line = r.one_error()
    assert "corrupt" in line and "flipped.aedat4" in line, line
    assert r.wall_s < 30
    assert video_frames(video) > 0  # what was played before the damage is kept


@pytest.mark.parametrize("case, needle", [("outside", "outside the 64x48 sensor"), ("backwards", "timestamps go backwards")])
def test_impossible_events_stop_with_the_file_named_and_video_kept(tmp_path: Path, good, case: str, needle: str) -> None:
    _, ev = good
    bad = ev.copy()
    if case == "outside":
        bad["x"][N // 2] = 200
    else:
        bad["timestamp"][N // 2] -= 100_000
    src = write_aedat4(tmp_path / f"{case}.aedat4", bad, SIZE, batch=1000)
    r, video, stats = _run(tmp_path, src)
    assert r.rc == 1, r.stderr
    line = r.one_error()
    assert needle in line and "corrupt" in line and f"{case}.aedat4" in line, line
    assert f"after {N // 2} good events" in line
    assert stats is not None and stats["summary"]["events_in"] == N // 2  # every good event went in
    # The video holds the steps that reached the sink before the stop (how many is a race
    # today: see test_steps_binned_before_a_source_error_reach_the_sinks); if written, it plays.
    if video.exists():
        assert video_frames(video) > 0


def test_steps_binned_before_a_source_error_reach_the_sinks(tmp_path: Path) -> None:
    """A corrupt file after good data: the good steps are the user's output; the model and
    sinks are healthy, so they should drain (within engine.drain_s) like on Ctrl-C."""
    from stream.config import load_config
    from stream.engine import run_pipeline
    from stream.events import SensorSize
    from tests.stream.conftest import EchoModel, ListSink, ListSource, packets

    size = SensorSize(32, 24)
    cfg = load_config(overrides={"engine": {"status_s": 0, "device": "cpu"}, "binner": {"bin_us": 1000}})
    src = ListSource(packets(30, size), size, fail_at=25)  # 25 good ms, then a read error
    sink = ListSink()
    model = EchoModel(delay_s=0.005)
    s = run_pipeline(cfg, src, [sink], run_dir=tmp_path / "run",
                     model_factory=lambda *a, **k: model)
    assert s.exit_code == 1 and "source broke" in (s.error or "")
    assert s.steps >= 24
    assert s.masks == s.steps and len(sink.items) == s.steps, (s.steps, s.masks, len(sink.items))


def test_duplicated_timestamps_are_normal_input(tmp_path: Path, good) -> None:
    _, ev = good
    dup = ev.copy()
    dup[1000:3000] = dup[1000]  # 2000 identical events (same time, same pixel)
    dup["timestamp"][5000:6000] = dup["timestamp"][5000]  # 1000 events at one timestamp
    src = write_aedat4(tmp_path / "dup.aedat4", dup, SIZE, batch=1000)
    r, video, stats = _run(tmp_path, src)
    assert r.rc == 0, r.stderr
    assert not r.error_lines
    assert stats["summary"]["events_in"] == N
    assert stats["summary"]["steps"] == 200  # 200 ms of 1 ms bins, none lost or doubled
    assert video_frames(video) > 0


def test_hour_long_silence_resets_instead_of_binning_an_hour(tmp_path: Path) -> None:
    """100 events, one hour of nothing, 100 events: the binner resets at the gap
    (binner.gap_reset_s) instead of emitting 3.6 million empty steps."""
    t = np.r_[np.arange(100) * 100, 3_600_000_000 + np.arange(100) * 100] + 1_000_000
    i = np.arange(200)
    src = write_aedat4(tmp_path / "silence.aedat4", make_events(t, i % 64, i % 48, i % 2), SIZE, batch=50)
    r, video, stats = _run(tmp_path, src)
    assert r.rc == 0, r.stderr
    assert r.wall_s < 30
    s = stats["summary"]
    assert s["events_in"] == 200
    assert s["steps"] < 100, s  # 2 x 10 ms of events, not an hour of empty bins
    assert video_frames(video) > 0


@pytest.fixture(scope="module")
def burst(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """25 Mev/s for 40 ms on a 346x260 sensor (the shared Prophesee recording peaks at 11 Mev/s)."""
    d = tmp_path_factory.mktemp("burst")
    ev = random_events(1_000_000, (346, 260), span_us=40_000, seed=3)
    return write_aedat4(d / "burst.aedat4", ev, (346, 260), batch=25_000)


@pytest.mark.slow
def test_25_mev_per_s_burst_unpaced_loses_nothing(tmp_path: Path, burst: Path) -> None:
    r, video, stats = _run(tmp_path, burst, timeout=120)
    assert r.rc == 0, r.stderr
    s = stats["summary"]
    assert s["events_in"] == 1_000_000
    assert s["steps"] == 40 and s["masks"] == 40
    assert not any(s["drops"].values()), s["drops"]
    assert video_frames(video) > 0


@pytest.mark.slow
def test_25_mev_per_s_burst_paced_drops_are_counted_and_shown(tmp_path: Path, burst: Path) -> None:
    """Paced (live) replay faster than the model: the live queue (8 ms = 8 bins here) drops the
    oldest steps, the run still ends 0, and the summary line shows the drops."""
    cfg = small_cfg(tmp_path, engine={"live_queue_ms": 8.0, "status_s": 0})
    video = tmp_path / "out.mp4"
    stats = tmp_path / "stats.json"
    r = cli(["-c", str(cfg), "--source", str(burst), "--realtime", "--sink", f"overlay:{video}",
             "--stats-json", str(stats)], tmp_path, timeout=120)
    assert r.rc == 0, r.stderr
    s = json.loads(stats.read_text())["summary"]
    dropped = s["drops"].get("model_in", 0)
    assert dropped > 0 and s["masks"] + dropped == s["steps"] == 40, s
    summary = next(ln for ln in r.stderr.splitlines() if ln.startswith("summary:"))
    assert f"model_in {dropped}" in summary
    assert video_frames(video) > 0
