"""Binner against hand-computed bins: empty bins, edges, out-of-range, backwards, live closing."""
from __future__ import annotations

import numpy as np
import torch
import pytest

from stream.binner import Binner, BinnerConfig, _bin_numpy, bin_events, clean_events
from stream.config import build
from stream.events import EventPacket, SensorSize, Step, StreamReset, make_events
from stream.metrics import Metrics

SIZE = SensorSize(4, 3)


def _binner(bin_us: int = 10, polarity: str = "split", **kw) -> tuple[Binner, Metrics]:
    m = Metrics()
    cfg = build(BinnerConfig, {"bin_us": bin_us, "polarity": polarity, **kw})
    return Binner(cfg, SIZE, "cpu", "test", m), m


def _steps(items) -> list[Step]:
    return [s for s in items if isinstance(s, Step)]


def test_bins_align_to_first_event_and_emit_empty_bins() -> None:
    b, _ = _binner()
    ev = make_events([5, 7, 15, 16, 42], [0, 1, 2, 3, 1], [0, 1, 2, 2, 0], [1, 0, 1, 1, 0])
    steps = _steps(b.process(EventPacket(ev, SIZE)))
    # bins [5,15) [15,25) [25,35) are complete (latest event 42 < 45)
    assert [(s.index, s.t0_us, s.t1_us, s.n_events) for s in steps] == [(0, 5, 15, 2), (1, 15, 25, 2), (2, 25, 35, 0)]
    f0 = steps[0].frame.numpy()
    assert f0.shape == (2, 3, 4)
    assert f0[1, 0, 0] == 1 and f0[0, 1, 1] == 1 and f0.sum() == 2
    assert steps[2].frame.sum() == 0  # empty bin is emitted, all zeros
    last = b.flush()
    assert [(s.index, s.t0_us, s.t1_us, s.n_events) for s in last] == [(3, 35, 45, 1)]


def test_bin_edges_are_half_open_and_counts_accumulate() -> None:
    b, _ = _binner()
    ev = make_events([0, 9, 9, 10, 20], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1])
    steps = _steps(b.process(EventPacket(ev, SIZE, t_end_us=30)))
    assert [s.n_events for s in steps] == [3, 1, 1]
    assert steps[0].frame[1, 1, 1] == 3.0  # duplicates and same-pixel events are counted


def test_merge_polarity_gives_one_channel() -> None:
    b, _ = _binner(polarity="merge")
    ev = make_events([0, 1], [2, 2], [1, 1], [0, 1])
    (s,) = _steps(b.process(EventPacket(ev, SIZE, t_end_us=10)))
    assert tuple(s.frame.shape) == (1, 3, 4) and s.frame[0, 1, 2] == 2.0


def test_out_of_range_and_backwards_are_dropped_and_counted() -> None:
    b, m = _binner()
    ev = make_events([0, 1, 2, 1, 3, 4], [0, 4, 1, 1, -1, 3], [0, 0, 2, 1, 0, 3], [1, 1, 1, 1, 1, 0])
    # x=4 out (width 4), x=-1 out, y=3 out (height 3); t=1 after t=2 goes backwards
    steps = _steps(b.process(EventPacket(ev, SIZE, t_end_us=10)))
    assert sum(s.n_events for s in steps) == 2
    c = m.snapshot()["counters"]
    assert c["drops.out_of_range"] == 3 and c["drops.backwards"] == 1
    # an event earlier than an already closed bin is dropped, not a crash
    later = _steps(b.process(EventPacket(make_events([5], [0], [0], [1]), SIZE, t_end_us=20)))
    assert sum(s.n_events for s in later) == 0
    assert m.snapshot()["counters"]["drops.backwards"] == 2


def test_live_source_closes_bins_on_t_end_without_events() -> None:
    b, _ = _binner()
    assert _steps(b.process(EventPacket(make_events([100], [0], [0], [1]), SIZE))) == []
    empty = make_events([], [], [], [])
    steps = _steps(b.process(EventPacket(empty, SIZE, t_end_us=131)))
    assert [(s.t0_us, s.n_events) for s in steps] == [(100, 1), (110, 0), (120, 0)]


def test_reset_realigns_and_keeps_step_index() -> None:
    b, _ = _binner()
    s1 = _steps(b.process(EventPacket(make_events([0, 12], [0, 0], [0, 0], [1, 1]), SIZE)))
    out = b.process(StreamReset("next file"))
    assert isinstance(out[-1], StreamReset)
    flushed = _steps(out)
    s2 = _steps(b.process(EventPacket(make_events([1000, 1003], [1, 1], [1, 1], [1, 0]), SIZE, t_end_us=1010)))
    idx = [s.index for s in s1 + flushed + s2]
    assert idx == list(range(len(idx)))
    assert s2[0].t0_us == 1000


def test_long_gap_resets_instead_of_emitting_every_bin() -> None:
    b, m = _binner(bin_us=1000, gap_reset_s=1.0)
    b.process(EventPacket(make_events([0], [0], [0], [1]), SIZE))
    out = b.process(EventPacket(make_events([3_600_000_000], [1], [1], [1]), SIZE, t_end_us=3_600_001_000))
    assert len(_steps(out)) <= 3
    assert any(isinstance(o, StreamReset) for o in out)
    assert m.snapshot()["counters"]["binner.gap_resets"] == 1


def test_labels_follow_their_events() -> None:
    b, _ = _binner()
    ev = make_events([0, 1, 11, 12], [0, 9, 1, 2], [0, 0, 1, 2], [1, 1, 1, 1])  # x=9 dropped
    lab = np.array([3, 4, 5, 0], dtype=np.int16)
    steps = _steps(b.process(EventPacket(ev, SIZE, t_end_us=20, labels=lab)))
    assert steps[0].labels.tolist() == [3] and steps[1].labels.tolist() == [5, 0]


def test_compiled_binning_matches_reference() -> None:
    rng = np.random.default_rng(0)
    n, h, w = 20000, 17, 23
    t = np.sort(rng.integers(0, 5000, n))
    ev = make_events(t, rng.integers(0, w, n), rng.integers(0, h, n), rng.integers(0, 2, n))
    for c in (1, 2):
        a = bin_events(ev, 0, 1000, 5, c, h, w)
        r = _bin_numpy(ev, 0, 1000, 5, c, h, w)
        np.testing.assert_array_equal(a, r)
        assert a.sum() == n


def test_compiled_binning_matches_reference_in_any_time_order() -> None:
    # The kernel walks bins in time order and falls back to a division for an event
    # outside the current bin: shuffled input and a non-zero t0 must give the same counts.
    rng = np.random.default_rng(1)
    n, h, w, t0 = 5000, 9, 31, 123_456
    t = rng.integers(t0, t0 + 7 * 100, n)
    ev = make_events(t, rng.integers(0, w, n), rng.integers(0, h, n), rng.integers(0, 2, n))
    for c in (1, 2):
        np.testing.assert_array_equal(bin_events(ev, t0, 100, 7, c, h, w), _bin_numpy(ev, t0, 100, 7, c, h, w))
    assert bin_events(ev[:0], t0, 100, 7, 2, h, w).shape == (7, 2, h, w)


def test_clean_events_does_not_mutate_input() -> None:
    ev = make_events([3, 1, 2], [0, 0, 9], [0, 0, 0], [1, 1, 1])
    before = ev.copy()
    clean_events(ev, SIZE, -1)
    np.testing.assert_array_equal(ev, before)


def test_events_before_the_previous_packet_are_dropped_past_the_first() -> None:
    # t_floor holds for every event of the packet, not only the first (it used to be
    # forgotten after the first event, so 60 here was kept and binned before t0)
    ev = make_events([50, 60, 120, 110], [0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1])
    kept, n_out, n_back, keep = clean_events(ev, SIZE, 100)
    assert kept["timestamp"].tolist() == [120] and (n_out, n_back) == (0, 3)
    assert keep.tolist() == [False, False, True, False]


def test_compiled_scan_matches_reference() -> None:
    from stream.binner import _scan_kernel, _scan_numpy

    rng = np.random.default_rng(2)
    n = 3000
    ev = make_events(rng.integers(0, 400, n), rng.integers(-2, 6, n), rng.integers(-1, 4, n), rng.integers(0, 2, n))
    for t_floor in (np.iinfo(np.int64).min, 0, 200):
        k1, k2 = np.empty(n, np.bool_), np.empty(n, np.bool_)
        r1 = _scan_kernel(ev["timestamp"], ev["x"], ev["y"], 4, 3, np.int64(t_floor), k1)
        r2 = _scan_numpy(ev["timestamp"], ev["x"], ev["y"], 4, 3, t_floor, k2)
        assert tuple(int(v) for v in r1) == r2
        np.testing.assert_array_equal(k1, k2)


def test_concat_and_take_events_equal_numpy() -> None:
    from stream.events import EVENT_DTYPE, concat_events, take_events

    rng = np.random.default_rng(3)
    ev = make_events(np.arange(50), rng.integers(0, 4, 50), rng.integers(0, 3, 50), rng.integers(0, 2, 50))
    parts = [ev[:7], ev[7:7], ev[7:31], ev[31:]]
    out = concat_events(parts)
    assert out.dtype == EVENT_DTYPE
    np.testing.assert_array_equal(out, np.concatenate(parts))
    mask = rng.integers(0, 2, 50).astype(bool)
    np.testing.assert_array_equal(take_events(ev, mask), ev[mask])
    with pytest.raises(ValueError, match="EVENT_DTYPE"):
        concat_events([ev, np.zeros(3, np.int64)])


def test_config_validation() -> None:
    from stream.node import UsageError

    with pytest.raises(UsageError, match="bin_us"):
        build(BinnerConfig, {"bin_us": 0})
    with pytest.raises(UsageError, match="polarity"):
        build(BinnerConfig, {"polarity": "both"})


def test_events_spanning_packets_keep_the_dv_layout() -> None:
    from stream.events import EVENT_DTYPE

    b, _ = _binner()
    b.process(EventPacket(make_events([0, 1], [0, 1], [0, 0], [1, 1]), SIZE))
    b.process(EventPacket(make_events([2, 3], [1, 2], [0, 0], [1, 0]), SIZE))
    (s,) = _steps(b.process(EventPacket(make_events([10], [0], [0], [1]), SIZE)))
    assert s.events.dtype == EVENT_DTYPE and s.n_events == 4


def test_recycled_frames_are_never_reused_while_referenced() -> None:
    import gc

    b, _ = _binner(bin_us=10)
    rng = np.random.default_rng(4)

    def feed(t_start: int, n_bins: int) -> list[Step]:
        t = np.sort(rng.integers(t_start, t_start + 10 * n_bins, 200))
        ev = make_events(t, rng.integers(0, SIZE.width, 200), rng.integers(0, SIZE.height, 200), rng.integers(0, 2, 200))
        out: list[Step] = []
        for a in range(0, 200, 20):  # packets of 20 events: one bin closes at a time
            out += _steps(b.process(EventPacket(ev[a : a + 20], SIZE)))
        return out

    kept = feed(0, 40)
    expect = [s.frame.clone() for s in kept]
    views = [s.frame[1] for s in kept[:5]]  # views keep their frame alive too
    ptrs = {s.frame.data_ptr() for s in kept}
    more = feed(1000, 40)
    for s, e in zip(kept, expect):  # nothing handed out was overwritten
        assert torch.equal(s.frame, e)
    for s in more:
        np.testing.assert_array_equal(s.frame.numpy(), _bin_numpy(s.events, s.t0_us, 10, 1, 2, SIZE.height, SIZE.width)[0])
    assert not ptrs & {s.frame.data_ptr() for s in more}  # all still held: fresh buffers
    del kept, expect, more, s
    gc.collect()
    held = {v.data_ptr() - v.storage_offset() * 4 for v in views}
    again = feed(2000, 40)
    reused = {s.frame.data_ptr() for s in again}
    assert reused & ptrs  # released frames are recycled ...
    assert not reused & held  # ... but not those a view still holds
    for s in again:
        np.testing.assert_array_equal(s.frame.numpy(), _bin_numpy(s.events, s.t0_us, 10, 1, 2, SIZE.height, SIZE.width)[0])


def test_tiled_binning_matches_reference() -> None:
    # small tiles (2**6 elements) and every alignment offset, so that events land in many
    # tiles, tiles straddle bins and channels, and the first/last tiles are partial
    from stream.binner import _bin_tiled_kernel

    rng = np.random.default_rng(5)
    n, h, w, t0 = 4000, 13, 19, 777
    t = np.sort(rng.integers(t0, t0 + 6 * 50, n))
    ev = make_events(t, rng.integers(0, w, n), rng.integers(0, h, n), rng.integers(0, 2, n))
    shuffled = ev[rng.permutation(n)]
    for c in (1, 2):
        ref = _bin_numpy(ev, t0, 50, 6, c, h, w)
        for first in (0, 1, 37, 63):
            for e in (ev, shuffled):
                out = np.zeros((6, c, h, w), np.float32)
                _bin_tiled_kernel(e["timestamp"], e["x"], e["y"], e["polarity"], np.int64(t0), np.int64(50), out, c, np.int64(first), np.int64(6))
                np.testing.assert_array_equal(out, ref)


def test_bin_events_takes_the_tiled_path_for_large_sparse_outputs() -> None:
    # 1280x720, 5 bins = 37 MB with 0.04 events per line: the tiled kernel's case
    rng = np.random.default_rng(6)
    n, h, w = 20_000, 720, 1280
    t = np.sort(rng.integers(0, 5_000, n))
    ev = make_events(t, rng.integers(0, w, n), rng.integers(0, h, n), rng.integers(0, 2, n))
    out = bin_events(ev, 0, 1000, 5, 2, h, w)
    ref = _bin_numpy(ev, 0, 1000, 5, 2, h, w)
    np.testing.assert_array_equal(out, ref)
