"""Tests of the built-in synthetic DVS scene (sources/synthetic.py).

Small sensors and short durations keep the file fast; every property is checked on the
real emulator (no mocks), and each check has a counterpart that shows it can fail.
"""
from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from sources.synthetic import (
    SCENES,
    SyntheticConfig,
    SyntheticScene,
    SyntheticSource,
    benchmark_scenes,
    make_synthetic,
    reflect,
)
from stream.clock import FakeClock
from stream.config import Config, build
from stream.events import EVENT_DTYPE, EventPacket
from stream.node import NodeError, RunContext, UsageError
from stream.registry import SOURCES

SMALL = {"width": 128, "height": 96, "duration_s": 0.3}


def small(**kw) -> SyntheticConfig:
    return build(SyntheticConfig, {**SMALL, **kw})


def run_source(cfg: SyntheticConfig, clock=None, stop: threading.Event | None = None):
    src = SyntheticSource(cfg, clock=clock) if clock is not None else SyntheticSource(cfg)
    src.open(RunContext(stop=stop or threading.Event(), metrics=None))
    try:
        packets = list(src.packets())
    finally:
        src.close()
    return src, packets


def concat(packets: list[EventPacket]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p.events for p in packets]), np.concatenate([p.labels for p in packets])


# ----- config ---------------------------------------------------------------------------
def test_config_defaults_and_validation() -> None:
    c = SyntheticConfig()
    assert (c.width, c.height, c.seed, c.scene, c.duration_s, c.realtime) == (346, 260, 0, "mixed", 10.0, False)
    with pytest.raises(UsageError, match="width=8 is out of range; allowed 16..4096"):
        build(SyntheticConfig, {"width": 8})
    with pytest.raises(UsageError, match="multiple of substep_us"):
        build(SyntheticConfig, {"substep_us": 300, "batch_us": 1000})
    with pytest.raises(UsageError, match="speed_px_s"):
        build(SyntheticConfig, {"speed_px_s": [50, 10]})
    assert build(SyntheticConfig, {"speed_px_s": [10, 50]}).speed_px_s == (10.0, 50.0)


def test_unknown_scene_is_a_usage_error_naming_the_valid_ones() -> None:
    cfg = Config(synthetic=SyntheticConfig())
    with pytest.raises(UsageError) as e:
        make_synthetic("galaxies", cfg)
    msg = str(e.value)
    assert "galaxies" in msg and all(s in msg for s in SCENES) and "\n" not in msg
    with pytest.raises(UsageError, match="satellites"):
        build(SyntheticConfig, {"scene": "galaxies"})
    src = make_synthetic("satellites", cfg)
    assert src.cfg.scene == "satellites" and src.describe() == "synthetic:satellites seed=0 346x260"
    assert make_synthetic(None, cfg).cfg.scene == "mixed"
    assert SOURCES["synthetic"].factory is make_synthetic


# ----- packets --------------------------------------------------------------------------
def test_packets_dtype_sorted_within_spans_and_in_range() -> None:
    cfg = small(scene="mixed", packet_us=700, duration_s=0.2)
    src, packets = run_source(cfg)
    assert src.size.width == 128 and src.size.height == 96 and src.live is False
    t_prev = 0
    for p in packets:
        assert p.events.dtype == EVENT_DTYPE and p.labels is not None and p.labels.dtype == np.int16
        ts = p.events["timestamp"]
        assert np.all(np.diff(ts) >= 0)
        assert p.t_end_us - t_prev == 700 or p.t_end_us == 200_000
        assert np.all((ts >= t_prev) & (ts < p.t_end_us))
        t_prev = p.t_end_us
    ev, lab = concat(packets)
    assert len(ev) > 1000 and (lab > 0).sum() > 500  # the scene is not empty
    assert ev["x"].min() >= 0 and ev["x"].max() < 128 and ev["y"].min() >= 0 and ev["y"].max() < 96
    assert set(np.unique(ev["polarity"])) == {0, 1}
    assert set(np.unique(lab[lab > 0])) <= set(src.object_classes())


def test_duration_is_respected_and_last_span_is_cut() -> None:
    _, packets = run_source(small(duration_s=0.0105, packet_us=1000))
    assert [p.t_end_us for p in packets] == [1000 * i for i in range(1, 11)] + [10_500]
    assert all(len(p.events) == 0 or p.events["timestamp"].max() < 10_500 for p in packets)


def test_endless_stream_stops_on_ctx_stop() -> None:
    stop = threading.Event()
    src = SyntheticSource(small(duration_s=0.0))
    src.open(RunContext(stop=stop, metrics=None))
    got = []
    for p in src.packets():
        got.append(p)
        if len(got) == 300:  # past the duration any finite default would give at 1 ms
            stop.set()
    src.close()
    assert len(got) == 300 and got[-1].t_end_us == 300_000


def test_packets_before_open_is_a_node_error() -> None:
    with pytest.raises(NodeError, match="open"):
        next(SyntheticSource(small()).packets())


def test_realtime_pacing_on_fake_clock() -> None:
    clock = FakeClock(start=50.0)
    seen = []
    src = SyntheticSource(small(realtime=True, duration_s=0.01, packet_us=2000), clock=clock)
    assert src.live is True
    src.open(RunContext(stop=threading.Event(), metrics=None))
    for p in src.packets():
        seen.append((p.t_end_us, clock.now()))
    assert [t for t, _ in seen] == [2000, 4000, 6000, 8000, 10_000]
    for t_end, now in seen:
        assert now == pytest.approx(50.0 + t_end / 1e6, abs=1e-9)
    assert clock.sleeps == pytest.approx([0.002] * 5, abs=1e-9)
    # not realtime: no sleeping at all
    clock2 = FakeClock(start=50.0)
    run_source(small(duration_s=0.01), clock=clock2)
    assert clock2.sleeps == [] and clock2.now() == 50.0


# ----- determinism ----------------------------------------------------------------------
def test_deterministic_by_seed_and_independent_of_packet_size() -> None:
    a, la = concat(run_source(small(seed=7, duration_s=0.15))[1])
    b, lb = concat(run_source(small(seed=7, duration_s=0.15, packet_us=3100))[1])
    c, _ = concat(run_source(small(seed=8, duration_s=0.15))[1])
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert len(a) != len(c) or not np.array_equal(a, c)


# ----- emulator physics -----------------------------------------------------------------
def test_noise_scene_rate_and_labels() -> None:
    cfg = small(scene="noise", noise_hz=2.0, n_hot_pixels=0, duration_s=1.0, jitter_px=2.0)
    ev, lab = concat(run_source(cfg)[1])
    expected = 2.0 * 128 * 96 * 1.0
    assert np.all(lab == 0)
    assert abs(len(ev) - expected) < 4 * np.sqrt(expected)  # Poisson, 4 sigma
    assert 0.45 < ev["polarity"].mean() < 0.55


def test_hot_pixels_fire_at_their_rates() -> None:
    ev, lab = concat(run_source(small(scene="noise", noise_hz=0.0, n_hot_pixels=3, duration_s=1.0))[1])
    pix = ev["y"].astype(np.int64) * 128 + ev["x"]
    ids, counts = np.unique(pix, return_counts=True)
    assert len(ids) == 3 and np.all(lab == 0)
    assert np.all((counts > 30) & (counts < 260))  # 50-200 Hz for 1 s, Poisson


def _min_gap_per_pixel(ev: np.ndarray, width: int) -> int:
    pix = ev["y"].astype(np.int64) * width + ev["x"]
    order = np.lexsort((ev["timestamp"], pix))
    p, t = pix[order], ev["timestamp"][order]
    same = p[1:] == p[:-1]
    return int(np.diff(t)[same].min())


def test_refractory_period_per_pixel() -> None:
    base = dict(scene="shapes", speed_px_s=[150.0, 200.0], contrast_on=0.1, contrast_off=0.1, mismatch=0.0,
                duration_s=0.15)
    ev0, _ = concat(run_source(small(refractory_us=0, **base))[1])
    ev1, _ = concat(run_source(small(refractory_us=800, **base))[1])
    assert _min_gap_per_pixel(ev0, 128) < 800  # without it, pixels do fire faster
    assert _min_gap_per_pixel(ev1, 128) >= 800
    assert len(ev1) < len(ev0)


def test_stars_fire_only_under_jitter() -> None:
    kw = dict(scene="satellites", noise_hz=0.0, n_hot_pixels=0, n_objects=1, duration_s=0.2, width=160, height=120)
    _, lab_still = concat(run_source(small(**kw))[1])
    _, lab_shake = concat(run_source(small(jitter_px=1.5, **kw))[1])
    assert (lab_still == 0).sum() == 0  # a still camera sees no static star
    assert (lab_shake == 0).sum() > 200  # camera shake makes the star field fire (label 0)


def test_objects_produce_on_and_off_and_events_lie_on_the_object() -> None:
    cfg = small(scene="mixed", n_objects=4, duration_s=0.25, class_by_kind=True, noise_hz=0.0, n_hot_pixels=0)
    src = SyntheticSource(cfg)
    src.open(RunContext(stop=threading.Event(), metrics=None))
    checked = 0
    for p in src.packets():
        keep = p.labels > 0
        for e, lab in zip(p.events[keep][::7], p.labels[keep][::7]):
            objs = {o.id: o for o in src.scene.objects_at(float(e["timestamp"]))}
            assert lab in objs, f"label {lab} at t={e['timestamp']} names no live object"
            x0, y0, x1, y1 = objs[lab].bbox
            assert x0 - 1 <= e["x"] <= x1 + 1 and y0 - 1 <= e["y"] <= y1 + 1
            checked += 1
    assert checked > 300
    classes = src.object_classes()
    assert set(classes.values()) == {1, 2}  # satellites = 1, the shape = 2
    src.close()


def test_every_object_makes_both_polarities_and_mask_matches_labels() -> None:
    cfg = small(scene="shapes", n_objects=2, duration_s=0.1, noise_hz=0.0, n_hot_pixels=0)
    src, packets = run_source(cfg)
    ev, lab = concat(packets)
    for oid in src.object_classes():
        pol = ev["polarity"][lab == oid]
        assert (pol == 1).sum() > 50 and (pol == 0).sum() > 50, f"object {oid} lacks an edge polarity"
    # ground-truth mask at the end: labelled events of the last ms lie on or next to the mask
    scene = src.scene
    m = scene.mask_at(100_000.0, alpha_min=0.01)
    last = ev["timestamp"] >= 99_000
    hits = m[ev["y"][last & (lab > 0)], ev["x"][last & (lab > 0)]]
    assert len(hits) > 20 and (hits > 0).mean() > 0.8
    assert (m[ev["y"][last & (lab > 0)], ev["x"][last & (lab > 0)]] == lab[last & (lab > 0)]).mean() > 0.8


def test_reflect_is_a_triangle_wave() -> None:
    x = np.array([0.0, 5.0, 10.0, 12.0, 20.0, 25.0, -3.0])
    assert np.allclose(reflect(x, 0.0, 10.0), [0, 5, 10, 8, 0, 5, 3])


def test_benchmark_scenes_are_fixed_and_held_out() -> None:
    sc = benchmark_scenes()
    names = [n for n, _ in sc]
    assert len(set(names)) == len(names) and "sat_jitter" in names and "noise" in names
    assert all(c.seed >= 1000 and c.duration_s == 2.0 and (c.width, c.height) == (346, 260) for _, c in sc)
    assert {c.scene for _, c in sc} == set(SCENES)
    assert any(c.jitter_px > 0 and c.scene == "satellites" for _, c in sc)
    assert sc == benchmark_scenes()


def test_scene_objects_are_deterministic_and_dataclass_config_is_frozen() -> None:
    a = SyntheticScene(small(scene="digits", seed=3))
    b = SyntheticScene(small(scene="digits", seed=3))
    assert [dataclasses.astuple(o) for o in a.objects_at(1000.0)] == [dataclasses.astuple(o) for o in b.objects_at(1000.0)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.cfg.seed = 4  # type: ignore[misc]


def test_output_buffer_overflow_redoes_the_batch_exactly() -> None:
    from sources.synthetic import _alloc_out

    cfg = small(scene="shapes", duration_s=0.05, noise_hz=0.0)
    a = SyntheticScene(cfg)
    b = SyntheticScene(cfg)
    b._out = _alloc_out(4)  # forces the kernel's "too many events" path on every busy batch
    ea, la = a.events_until(50_000)
    eb, lb = b.events_until(50_000)
    assert len(ea) > 100 and len(b._out[0]) > 4
    assert np.array_equal(ea, eb) and np.array_equal(la, lb)
