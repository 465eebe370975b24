"""Noise filter and ROI: dv-processing parity, hot pixels, crop/downscale maths, labels."""
from __future__ import annotations

import datetime
import threading

import dv_processing as dv
import numpy as np
import pytest

from stream.config import Config, build
from stream.events import EventPacket, SensorSize, StreamReset, make_events
from stream.metrics import Metrics
from stream.node import NodeError, RunContext, UsageError
from sources.prefilter import FilterConfig, RoiConfig, ba_keep, build_prefilter, roi_size
from tests.sources.aedat_util import concat, random_events, to_store


def make(size: SensorSize, filt: dict | None = None, roi: dict | None = None):
    cfg = Config({"filter": build(FilterConfig, filt or {}), "roi": build(RoiConfig, roi or {})})
    pf = build_prefilter(cfg, size)
    m = Metrics()
    pf.open(RunContext(stop=threading.Event(), metrics=m))
    return pf, m


def same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(a[k], b[k]) for k in ("timestamp", "x", "y", "polarity"))


@pytest.mark.parametrize("size", [(64, 48), (640, 480), (1280, 720)])
def test_background_activity_equals_dv_processing(size) -> None:
    sz = SensorSize(*size)
    # dense enough that some events are supported, sparse enough that many are not
    ev = random_events(30_000, size, t0_us=1_000_000, span_us=300_000 * (size[0] // 64), seed=size[0])
    pf, m = make(sz, {"enabled": True, "ba_window_us": 3000})
    # packet boundaries must not matter: the state carries over
    out = concat([pf.process(EventPacket(ev[i : i + 7001], sz)).events for i in range(0, len(ev), 7001)])
    ref_f = dv.noise.BackgroundActivityNoiseFilter(size, datetime.timedelta(microseconds=3000))
    ref_f.accept(to_store(ev))
    ref = ref_f.generateEvents().numpy()
    assert 0 < len(ref) < len(ev)
    assert same(out, ref)
    assert m.counters["filter.in"] == len(ev) and m.counters["filter.out"] == len(ref)


def test_ba_rule_by_hand() -> None:
    surface = np.full((4, 4), -(2**62), dtype=np.int64)
    t = np.array([10_000, 10_500, 10_900, 20_000, 20_100], dtype=np.int64)
    x = np.array([1, 2, 1, 1, 1], dtype=np.int16)
    y = np.array([1, 1, 1, 1, 3], dtype=np.int16)
    keep = ba_keep(t, x, y, surface, 1000)
    # 1st: nothing before; 2nd: neighbour (1,1) 500 µs ago; 3rd: neighbour (2,1) 400 µs ago;
    # 4th: neighbours all > 1000 µs old (its own pixel does not count); 5th: (1,3) not adjacent to (1,1)
    assert keep.tolist() == [False, True, True, False, False]
    assert surface[1, 1] == 20_000 and surface[3, 1] == 20_100


def test_disabled_costs_nothing() -> None:
    sz = SensorSize(640, 480)
    pf, m = make(sz)
    pkt = EventPacket(random_events(100, (640, 480)), sz, 5)
    assert pf.process(pkt) is pkt and not pf.active and m.counters == {}


def test_hot_pixels_masked_and_labels_aligned() -> None:
    sz = SensorSize(8, 8)
    ev = make_events(range(10), [0, 3, 3, 5, 3, 1, 3, 7, 7, 2], [0, 4, 4, 5, 4, 1, 4, 7, 6, 2], [1] * 10)
    labels = np.arange(10, dtype=np.int16)
    pf, m = make(sz, {"enabled": True, "background_activity": False, "hot_pixels": [[3, 4], [7, 7]]})
    out = pf.process(EventPacket(ev, sz, 99, labels))
    assert out.labels.tolist() == [0, 3, 5, 8, 9]
    assert out.events["x"].tolist() == [0, 5, 1, 7, 2] and out.t_end_us == 99
    assert m.counters["filter.in"] == 10 and m.counters["filter.out"] == 5


@pytest.mark.parametrize("size,crop,d,want", [
    ((640, 480), [100, 50, 320, 240], 1, (320, 240)),
    ((640, 480), None, 4, (160, 120)),
    ((1280, 720), [0, 0, 1280, 720], 3, (427, 240)),
    ((346, 260), None, 4, (87, 65)),
])
def test_roi_maths(size, crop, d, want) -> None:
    sz = SensorSize(*size)
    pf, _ = make(sz, roi={"crop": crop, "downscale": d})
    assert pf.size_out == SensorSize(*want) == roi_size(sz, tuple(crop) if crop else None, d)
    ev = random_events(5000, size, seed=7)
    labels = (np.arange(5000) % 5).astype(np.int16)
    before = ev.copy()
    out = pf.process(EventPacket(ev, sz, None, labels))
    assert same(ev, before)  # input not mutated
    x0, y0, w, h = crop or (0, 0, *size)
    inside = (ev["x"] >= x0) & (ev["x"] < x0 + w) & (ev["y"] >= y0) & (ev["y"] < y0 + h)
    assert np.array_equal(out.events["x"], (ev["x"][inside] - x0) // d)
    assert np.array_equal(out.events["y"], (ev["y"][inside] - y0) // d)
    assert np.array_equal(out.labels, labels[inside]) and out.size == pf.size_out
    assert out.events["x"].max() < want[0] and out.events["y"].max() < want[1]


def test_crop_validated_against_sensor() -> None:
    with pytest.raises(UsageError, match=r"does not fit the 640x480 sensor"):
        make(SensorSize(640, 480), roi={"crop": [600, 0, 100, 100]})
    with pytest.raises(UsageError, match="downscale"):
        build(RoiConfig, {"downscale": 0})
    with pytest.raises(UsageError, match="hot_pixels"):
        make(SensorSize(64, 48), {"enabled": True, "hot_pixels": [[64, 0]]})
    pf, _ = make(SensorSize(640, 480), roi={"crop": [0, 0, 320, 240]})
    with pytest.raises(NodeError, match="does not fit the 100x100 sensor"):
        pf.apply(StreamReset("next file: small", SensorSize(100, 100)))


def test_reset_retargets_and_clears_state() -> None:
    pf, _ = make(SensorSize(64, 48), {"enabled": True}, {"downscale": 2})
    pf.process(EventPacket(make_events([1_000_000], [5], [5], [1]), SensorSize(64, 48)))
    r = pf.apply(StreamReset("next file: b", SensorSize(32, 32)))
    assert r.size == SensorSize(16, 16) and pf.size_out == SensorSize(16, 16)
    # a neighbour of the pre-reset event would have been supported; after reset it is not
    out = pf.process(EventPacket(make_events([1_000_100], [6], [5], [1]), SensorSize(32, 32)))
    assert len(out.events) == 0


def test_out_of_sensor_events_dropped_not_crashing() -> None:
    sz = SensorSize(16, 16)
    pf, _ = make(sz, {"enabled": True})
    ev = make_events([1_000_000, 1_000_001, 1_000_002], [1, 40, -1], [1, 1, 1], [1, 1, 1])
    out = pf.process(EventPacket(ev, sz))
    assert len(out.events) == 0  # the in-range one has no support; the others are outside
