"""File replay: exact content from files written by dv-processing, ranges, pacing,
looping, globs, and every kind of bad input (missing, not AEDAT4, truncated, corrupt,
no event stream)."""
from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from stream.clock import FakeClock
from stream.config import build
from stream.events import EVENT_DTYPE, EventPacket, SensorSize, StreamReset, make_events
from stream.metrics import Metrics
from stream.node import NodeError, RunContext, UsageError
from stream.registry import SOURCES, resolve
from sources.aedat4 import Aedat4Source, ReplayConfig, dv_error_text, is_replay_spec
from tests.sources.aedat_util import (
    concat,
    random_events,
    write_aedat4,
    write_frames_only,
    write_imu_only,
)


def ctx() -> RunContext:
    return RunContext(stop=threading.Event(), metrics=Metrics())


def run_source(spec: str | Path, clock: FakeClock | None = None, **cfg) -> tuple[Aedat4Source, list]:
    src = Aedat4Source(str(spec), build(ReplayConfig, cfg), clock=clock)
    src.open(ctx())
    try:
        items = list(src.packets())
    finally:
        src.close()
    return src, items


def events_of(items: list) -> np.ndarray:
    return concat([it.events for it in items if isinstance(it, EventPacket)])


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return len(a) == len(b) and all(np.array_equal(a[k], b[k]) for k in ("timestamp", "x", "y", "polarity"))


@pytest.mark.parametrize("isolate", [True, False])
@pytest.mark.parametrize("size", [(64, 48), (640, 480), (1280, 720)])
def test_exact_events_out(tmp_path: Path, size: tuple[int, int], isolate: bool) -> None:
    ev = random_events(4321, size, seed=size[0])
    f = write_aedat4(tmp_path / "rec.aedat4", ev, size, batch=500)
    src, items = run_source(f, isolate=isolate)
    assert src.size == SensorSize(*size)
    out = events_of(items)
    assert out.dtype == EVENT_DTYPE and same(out, ev)
    assert all(isinstance(p, EventPacket) for p in items)
    # time keeps its unit: each packet promises completeness up to its last event + 1 µs
    for p in items:
        assert p.t_end_us == int(p.events["timestamp"][-1]) + 1
    assert len(items) == 9  # ceil(4321 / 500) stored packets, passed through unsplit


def test_empty_event_stream(tmp_path: Path) -> None:
    f = write_aedat4(tmp_path / "empty.aedat4", make_events([], [], [], []), (32, 24))
    src, items = run_source(f)
    assert src.size == SensorSize(32, 24) and items == []


def test_time_gaps_kept(tmp_path: Path) -> None:
    t = [1_000, 1_001, 5_000_000, 5_000_002, 9_000_000]
    ev = make_events(t, [0, 1, 2, 3, 4], [0, 0, 1, 1, 2], [1, 0, 1, 0, 1])
    f = write_aedat4(tmp_path / "gaps.aedat4", ev, (8, 8), batch=2)
    _, items = run_source(f)
    assert same(events_of(items), ev)
    assert [p.t_end_us for p in items] == [1_002, 5_000_003, 9_000_001]


def test_time_range(tmp_path: Path) -> None:
    t = np.arange(0, 3_000_000, 1000) + 10_000  # one event per ms over 3 s
    ev = make_events(t, t % 30, t % 20, t % 2)
    f = write_aedat4(tmp_path / "r.aedat4", ev, (30, 20), batch=250)
    _, items = run_source(f, start_s=0.5, end_s=1.25)
    out = events_of(items)
    want = ev[(t >= 10_000 + 500_000) & (t < 10_000 + 1_250_000)]
    assert same(out, want) and len(out) == 750
    _, items = run_source(f, start_s=2.9985)
    assert len(events_of(items)) == 1  # the very last event alone
    _, items = run_source(f, start_s=5.0)  # past the end: nothing, no error
    assert items == []


def test_pacing_maths_with_fake_clock(tmp_path: Path) -> None:
    # events every 100 µs over 10 ms, then a 20 ms gap, then 1 event
    t = list(range(1_000_000, 1_010_000, 100)) + [1_030_000]
    ev = make_events(t, [1] * len(t), [1] * len(t), [1] * len(t))
    f = write_aedat4(tmp_path / "p.aedat4", ev, (4, 4), batch=1000)
    clock = FakeClock(100.0)
    src = Aedat4Source(str(f), build(ReplayConfig, {"realtime": True, "speed": 2.0}), clock=clock)
    assert src.live is True
    src.open(ctx())
    emitted: list[tuple[float, EventPacket]] = []
    for p in src.packets():
        emitted.append((clock.now(), p))
    src.close()
    data = [(w, p) for w, p in emitted if len(p)]
    assert same(events_of([p for _, p in data]), ev)
    for w, p in data:
        span = int(p.events["timestamp"][-1]) - int(p.events["timestamp"][0])
        assert span < 1000  # split to <= 1 ms of sensor time
        due = 100.0 + (int(p.events["timestamp"][-1]) - 1_000_000) / 2e6
        assert w == pytest.approx(due, abs=1e-9)  # emitted exactly when due at 2x
    # through the 20 ms (sensor) gap: empty progress packets, t_end increasing, below the next event
    empties = [(w, p) for w, p in emitted if not len(p)]
    assert len(empties) >= 4
    ends = [p.t_end_us for _, p in empties]
    assert ends == sorted(ends) and max(ends) <= 1_030_000 and min(ends) > 1_009_900


def test_loop_single_file_resets(tmp_path: Path) -> None:
    ev = random_events(300, (16, 16), seed=2)
    f = write_aedat4(tmp_path / "l.aedat4", ev, (16, 16), batch=100)
    src = Aedat4Source(str(f), build(ReplayConfig, {"loop": True}))
    c = ctx()
    src.open(c)
    seen: list = []
    for item in src.packets():
        seen.append(item)
        if sum(isinstance(i, StreamReset) for i in seen) == 3:
            break
    src.close()
    resets = [i for i in seen if isinstance(i, StreamReset)]
    assert all(r.reason == "loop wrap" and r.size == SensorSize(16, 16) for r in resets)
    idx = [k for k, i in enumerate(seen) if isinstance(i, StreamReset)]
    passes = np.split(np.array(seen, dtype=object), idx)
    for part in passes[:3]:
        assert same(events_of([p for p in part if isinstance(p, EventPacket)]), ev)


def test_loop_over_empty_range_errors(tmp_path: Path) -> None:
    f = write_aedat4(tmp_path / "e.aedat4", make_events([], [], [], []), (8, 8))
    src = Aedat4Source(str(f), build(ReplayConfig, {"loop": True, "read_timeout_s": 5.0}))
    src.open(ctx())
    with pytest.raises(NodeError, match="nothing to loop"):
        list(src.packets())
    src.close()


def test_directory_and_glob_replay_in_order_with_resets(tmp_path: Path) -> None:
    a = random_events(200, (64, 48), seed=1)
    b = random_events(150, (640, 480), seed=2)
    c = random_events(100, (32, 32), seed=3)
    write_aedat4(tmp_path / "b.aedat4", b, (640, 480))
    write_aedat4(tmp_path / "a.aedat4", a, (64, 48))
    write_aedat4(tmp_path / "c.aedat4", c, (32, 32))
    (tmp_path / "notes.txt").write_text("not a recording")
    for spec in (tmp_path, tmp_path / "*.aedat4"):
        src, items = run_source(spec)
        assert src.size == SensorSize(64, 48)  # the first file's
        resets = [i for i in items if isinstance(i, StreamReset)]
        assert [(r.reason, r.size) for r in resets] == [
            ("next file: b.aedat4", SensorSize(640, 480)),
            ("next file: c.aedat4", SensorSize(32, 32)),
        ]
        k1, k2 = (items.index(r) for r in resets)
        assert same(events_of(items[:k1]), a) and same(events_of(items[k1:k2]), b) and same(events_of(items[k2:]), c)
        assert {p.size for p in items[k1:k2] if isinstance(p, EventPacket)} == {SensorSize(640, 480)}


def test_glob_loop_wraps_to_first_file(tmp_path: Path) -> None:
    write_aedat4(tmp_path / "a.aedat4", random_events(10, (8, 8), seed=1), (8, 8))
    write_aedat4(tmp_path / "b.aedat4", random_events(10, (9, 9), seed=2), (9, 9))
    src = Aedat4Source(str(tmp_path / "*.aedat4"), build(ReplayConfig, {"loop": True}))
    src.open(ctx())
    resets = []
    for item in src.packets():
        if isinstance(item, StreamReset):
            resets.append((item.reason, item.size))
            if len(resets) == 3:
                break
    src.close()
    assert resets == [
        ("next file: b.aedat4", SensorSize(9, 9)),
        ("loop wrap", SensorSize(8, 8)),
        ("next file: b.aedat4", SensorSize(9, 9)),
    ]


def test_path_errors_at_construction(tmp_path: Path) -> None:
    cfg = build(ReplayConfig, {})
    with pytest.raises(UsageError, match="not found"):
        Aedat4Source(str(tmp_path / "missing.aedat4"), cfg)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("x")
    with pytest.raises(UsageError, match="holds no .aedat4"):
        Aedat4Source(str(tmp_path / "d"), cfg)
    with pytest.raises(UsageError, match="matches no .aedat4"):
        Aedat4Source(str(tmp_path / "nothing*.aedat4"), cfg)
    with pytest.raises(UsageError, match="speed"):
        build(ReplayConfig, {"speed": 1000})


def test_registry_resolves_paths_dirs_globs(tmp_path: Path) -> None:
    assert is_replay_spec("x/rec.aedat4") and is_replay_spec("recs/*.aedat4") and is_replay_spec(str(tmp_path))
    assert not is_replay_spec("synthetic") and not is_replay_spec("tcp://h:1")
    entry, arg = resolve(SOURCES, "recs/*.aedat4", "source")
    assert entry.name == "file" and arg == "recs/*.aedat4"


def _open_error(path: Path, **cfg) -> tuple[str, float, list]:
    """Open and read ``path``; return the NodeError text, the seconds it took and what was yielded."""
    src = Aedat4Source(str(path), build(ReplayConfig, {"read_timeout_s": 1.0, **cfg}))
    got: list = []
    t0 = time.monotonic()
    try:
        src.open(ctx())
        for p in src.packets():
            got.append(p)
    except NodeError as e:
        return str(e), time.monotonic() - t0, got
    finally:
        src.close()
    return "", time.monotonic() - t0, got


def test_not_aedat4(tmp_path: Path) -> None:
    txt = tmp_path / "notes.aedat4"
    txt.write_text("hello\n" * 50)
    png = tmp_path / "image.aedat4"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    for f in (txt, png):
        msg, dt, _ = _open_error(f)
        assert msg.startswith(f"cannot open {f} as AEDAT4") and "\n" not in msg and dt < 10


def test_no_event_stream(tmp_path: Path) -> None:
    for f, kind in ((write_frames_only(tmp_path / "frames.aedat4"), "frames"), (write_imu_only(tmp_path / "imu.aedat4"), "imu")):
        msg, _, _ = _open_error(f)
        assert f"has no event stream (streams: {kind})" in msg


def test_truncated_files(tmp_path: Path) -> None:
    ev = random_events(3000, (64, 48), seed=9)
    good = write_aedat4(tmp_path / "good.aedat4", ev, (64, 48), batch=500).read_bytes()
    for cut in (0, 10, 300, len(good) // 3, len(good) // 2, len(good) - 200, len(good) - 20):
        f = tmp_path / f"cut{cut}.aedat4"
        f.write_bytes(good[:cut])
        msg, dt, got = _open_error(f)
        assert msg.startswith(f"cannot open {f} as AEDAT4"), (cut, msg)
        assert "truncated" in msg or "End-Of-File" in msg or "verify" in msg, msg
        assert got == [] and dt < 10


def test_corrupt_files_end_with_a_message_and_keep_what_was_read(tmp_path: Path) -> None:
    """Flipped bits in packet payloads: dv decodes garbage or hangs holding the GIL.

    Every outcome must be: the exact events (flip in padding), a NodeError naming how
    many events were read, or -- never -- a hang: the stall timeout (1 s here) kills
    the reader child.  Packets yielded before the error stay yielded (``got``).
    """
    ev = random_events(5000, (64, 48), seed=11)
    good = write_aedat4(tmp_path / "good.aedat4", ev, (64, 48), batch=500).read_bytes()
    rng = random.Random(3)
    outcomes = set()
    t0 = time.monotonic()
    for k in range(10):
        b = bytearray(good)
        off = rng.randrange(len(good) // 10, len(good) - 300)
        b[off] ^= 1 << rng.randrange(8)
        f = tmp_path / f"flip{k}.aedat4"
        f.write_bytes(bytes(b))
        msg, dt, got = _open_error(f)
        assert dt < 8, (off, msg)
        n_got = sum(len(p) for p in got)
        if msg:
            assert "\n" not in msg and str(f) in msg
            if "stalled" in msg:
                outcomes.add("stall")
                assert f"after {n_got} events" in msg
            elif "is corrupt" in msg:
                outcomes.add("garbage-detected")
                assert f"after {n_got} good events" in msg
            else:
                outcomes.add("dv-error")
        else:
            outcomes.add("read")  # undetectable garbage (no checksums) or a harmless flip
            assert n_got == len(ev)
        assert same(events_of(got), ev[:n_got]) or outcomes & {"read"}
    assert outcomes & {"stall", "garbage-detected", "dv-error"}, outcomes
    assert time.monotonic() - t0 < 50


def test_known_hang_is_cut_by_the_stall_timeout(tmp_path: Path) -> None:
    """A flip that made dv-processing 2.0.4 spin forever (found by the survey in the module doc)."""
    ev = random_events(5000, (64, 48), seed=11)
    good = write_aedat4(tmp_path / "good.aedat4", ev, (64, 48), batch=500).read_bytes()
    hang_found = False
    rng = random.Random(5)
    for k in range(40):
        b = bytearray(good)
        off = rng.randrange(len(good) // 10, len(good) - 300)
        for j in range(8):
            b[off + j] ^= 0xFF
        f = tmp_path / f"x{k}.aedat4"
        f.write_bytes(bytes(b))
        msg, dt, got = _open_error(f, read_timeout_s=0.5)
        assert dt < 6
        if "stalled" in msg:
            hang_found = True
            assert f"stalled after {sum(len(p) for p in got)} events" in msg
            break
    assert hang_found, "no flip hung dv-processing in 40 tries; the guard went untested"


def test_dv_error_text_is_one_line() -> None:
    err = RuntimeError(
        "/project/include/x.hpp(313): void f() [with T = std::byte]()\nEndOfFile: Error info: File a End-Of-File reached\n"
        "Stacktrace:\n 0# 0x0 in lib.so\n"
    )
    assert dv_error_text(err) == "EndOfFile: File a End-Of-File reached"


def test_stop_ends_unpaced_replay(tmp_path: Path) -> None:
    ev = random_events(2000, (16, 16), seed=4)
    f = write_aedat4(tmp_path / "s.aedat4", ev, (16, 16), batch=100)
    src = Aedat4Source(str(f), build(ReplayConfig, {"loop": True}))
    c = ctx()
    src.open(c)
    n = 0
    for p in src.packets():
        n += 1
        if n == 50:
            c.stop.set()
    src.close()
    src.close()  # idempotent
    assert 50 <= n <= 52
