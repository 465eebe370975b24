"""The engine with in-memory list sources and sinks and a stand-in model."""
from __future__ import annotations

import numpy as np
import pytest

from stream.config import load_config
from stream.engine import run_pipeline
from stream.events import MaskResult, SensorSize, StreamReset

from .conftest import HoldingModel, ListSink, ListSource, packets

SIZE = SensorSize(32, 24)


@pytest.fixture
def cfg():
    return load_config(overrides={"binner": {"bin_us": 1000}, "engine": {"device": "cpu", "status_s": 0, "max_batch": 8}})


def _masks(sink: ListSink) -> list[MaskResult]:
    return [i for i in sink.items if isinstance(i, MaskResult)]


def test_block_mode_keeps_order_and_loses_nothing(cfg, echo_factory, tmp_path) -> None:
    pk = packets(200, SIZE)
    src, a, b = ListSource(pk, SIZE), ListSink("a"), ListSink("b")
    s = run_pipeline(cfg, src, [a, b], model_factory=echo_factory, run_dir=tmp_path)
    assert s.error is None and s.exit_code == 0
    n_events = sum(len(p) for p in pk)
    for sink in (a, b):  # fan-out: every sink sees every step, in order
        ms = _masks(sink)
        assert [m.step.index for m in ms] == list(range(len(ms)))
        assert sum(m.step.n_events for m in ms) == n_events
        assert len(ms) == 200
    assert s.events_in == n_events and s.masks == 200
    assert all(v == 0 for v in s.drops.values())
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "stats.json").is_file()


def test_each_node_opened_and_closed_once(cfg, echo_factory, tmp_path) -> None:
    src, sink = ListSource(packets(5, SIZE), SIZE), ListSink()
    run_pipeline(cfg, src, [sink], model_factory=echo_factory, run_dir=tmp_path)
    model = echo_factory.holder["model"]
    assert (src.opened, src.closed, sink.opened, sink.closed, model.opened, model.closed) == (1, 1, 1, 1, 1, 1)


def test_live_source_drops_oldest_with_bounded_memory(echo_factory, tmp_path) -> None:
    # live capacity is sensor time: 8 ms of 1 ms bins = 8 steps (model_queue is for replays)
    cfg = load_config(overrides={"engine": {"device": "cpu", "status_s": 0, "live_queue_ms": 8.0, "max_batch": 1}})
    echo_factory.holder["kw"] = {"delay_s": 0.002}
    src, sink = ListSource(packets(600, SIZE, per_packet=5), SIZE, live=True), ListSink()
    s = run_pipeline(cfg, src, [sink], model_factory=echo_factory, run_dir=tmp_path)
    assert s.error is None
    assert s.drops["model_in"] > 0
    assert s.stats["queues"]["model_in"]["max_depth"] <= 8 + 2  # bounded (+ control items)
    ms = _masks(sink)
    assert len(ms) + s.drops["model_in"] == s.steps  # every step is either processed or counted
    idx = [m.step.index for m in ms]
    assert idx == sorted(idx)  # order kept even with drops


def test_micro_batches_keep_one_mask_per_step_in_order(cfg, echo_factory, tmp_path) -> None:
    echo_factory.holder["kw"] = {"delay_s": 0.001}
    src, sink = ListSource(packets(300, SIZE), SIZE), ListSink()
    run_pipeline(cfg, src, [sink], model_factory=echo_factory, run_dir=tmp_path)
    model = echo_factory.holder["model"]
    assert max(model.batches) > 1  # steps were queued and taken together
    assert [m.step.index for m in _masks(sink)] == list(range(300))


@pytest.mark.parametrize("where", ["source", "model", "sink"])
def test_error_in_any_node_stops_the_run_with_its_name(cfg, echo_factory, tmp_path, where) -> None:
    if where == "model":
        echo_factory.holder["kw"] = {"fail_at": 10}
    src = ListSource(packets(5000, SIZE), SIZE, fail_at=20 if where == "source" else None)
    sink = ListSink(fail_at=10 if where == "sink" else None)
    s = run_pipeline(cfg, src, [sink], model_factory=echo_factory, run_dir=tmp_path)
    assert s.exit_code == 1
    assert where in s.error and "broke" in s.error
    assert src.closed == 1 and sink.closed == 1 and echo_factory.holder["model"].closed == 1
    if where == "sink":
        assert len(sink.items) == 10  # what was produced before the error is kept


def test_a_node_that_holds_its_last_result_loses_none_and_keeps_order(cfg, echo_factory, tmp_path) -> None:
    """``iter_batch(batch, more=...)``: a pipelined node may keep a batch's last result while
    steps are queued behind it; the engine flushes it when none are, before a reset and at END."""
    echo_factory.holder.update(cls=HoldingModel, kw={"delay_s": 0.001})
    pk = packets(150, SIZE) + [StreamReset("next file")] + packets(150, SIZE, seed=1)
    src, sink = ListSource(pk, SIZE), ListSink()
    s = run_pipeline(cfg, src, [sink], model_factory=echo_factory, run_dir=tmp_path)
    model = echo_factory.holder["model"]
    assert s.error is None and s.masks == 300
    assert model.holds > 0 and model.held is None  # it did hold, and nothing stayed held
    kinds = ["R" if isinstance(i, StreamReset) else "M" for i in sink.items]
    assert kinds == ["M"] * 150 + ["R"] + ["M"] * 150  # the held mask came out before the reset
    idx = [m.step.index for m in _masks(sink)]
    assert idx == sorted(idx)


def test_resets_pass_through_in_order(cfg, echo_factory, tmp_path) -> None:
    pk = packets(4, SIZE) + [StreamReset("next file")] + packets(4, SIZE, seed=1)
    src, sink = ListSource(pk, SIZE), ListSink()
    run_pipeline(cfg, src, [sink], model_factory=echo_factory, run_dir=tmp_path)
    kinds = ["R" if isinstance(i, StreamReset) else "M" for i in sink.items]
    assert kinds.count("R") == 1 and kinds.index("R") >= 4
    assert echo_factory.holder["model"].resets == 1


def test_duration_limits_sensor_time(cfg, echo_factory, tmp_path) -> None:
    src, sink = ListSource(packets(100, SIZE), SIZE), ListSink()
    s = run_pipeline(cfg, src, [sink], model_factory=echo_factory, run_dir=tmp_path, duration_s=0.02)
    assert s.masks == 20 and s.error is None


def test_duration_counts_sensor_time_across_loop_wraps(cfg, echo_factory, tmp_path) -> None:
    """A looping replay restarts its timestamps at every wrap; --duration still ends the run."""
    one_pass = packets(10, SIZE)  # 10 ms of sensor time
    items = []
    for _ in range(50):  # "forever" for this run: 500 ms
        items += [StreamReset("loop wrap", SIZE), *one_pass]
    src, sink = ListSource(items[1:], SIZE), ListSink()
    s = run_pipeline(cfg, src, [sink], model_factory=echo_factory, run_dir=tmp_path, duration_s=0.035)
    assert s.error is None
    assert s.masks == 35  # three passes and a half, not 10 per pass forever


def test_stop_request_drains_and_closes(cfg, echo_factory, tmp_path) -> None:
    import threading

    from stream.engine import Pipeline

    echo_factory.holder["kw"] = {"delay_s": 0.001}
    src, sink = ListSource(packets(100000, SIZE, per_packet=1), SIZE), ListSink()
    pipe = Pipeline(cfg, src, [sink], model_factory=echo_factory, run_dir=tmp_path)
    done = threading.Event()
    result = {}

    def go():
        result["s"] = pipe.run()
        done.set()

    t = threading.Thread(target=go)
    t.start()
    # stop once some masks arrived (a condition, not a sleep)
    for _ in range(2000):
        if len(sink.items) > 20 or done.wait(0.005):
            break
    pipe.request_stop("test")
    assert done.wait(5.0), "pipeline did not stop within 5 s"
    assert result["s"].exit_code == 0 and result["s"].interrupted
    assert src.closed == sink.closed == 1
