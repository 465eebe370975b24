"""ModelNode: lifecycle, Step -> MaskResult, reset semantics, batch == stepwise, errors, CPU vs CUDA."""
from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.node import OVERLAP_DEPTH, ModelNode, build_model_node
from stream.config import Config, build
from stream.events import MaskResult, SensorSize, Step, StreamReset, empty_events
from stream.node import NodeError, RunContext, UsageError




SIZE = SensorSize(40, 32)


def _config(**model_kw) -> Config:
    cfg = Config()
    cfg["model"] = build(ModelConfig, {"conv1_gain": 40.0, "mask_window": 3, "path": "dense", **model_kw})
    return cfg


def _steps(n: int, size: SensorSize = SIZE, start: int = 0) -> list[Step]:
    """A 2-px bar moving right 1 px per step, ON leading / OFF trailing edge."""
    out = []
    for t in range(start, start + n):
        f = torch.zeros(2, size.height, size.width)
        x = 4 + t % (size.width - 8)
        f[1, 3 : size.height - 3, x] = 1.0
        f[0, 3 : size.height - 3, x - 2] = 1.0
        out.append(Step(t, t * 1000, (t + 1) * 1000, f, empty_events(), size, time.perf_counter_ns()))
    return out


def _ctx() -> RunContext:
    return RunContext(stop=threading.Event(), metrics=None)


def _node(**kw) -> ModelNode:
    node = build_model_node(_config(**kw), SIZE, 2, "cpu")
    node.open(_ctx())
    return node


def _summary(results: list[MaskResult]) -> list[tuple[bytes, dict[str, int]]]:
    return [(r.mask.tobytes(), r.layer_spikes) for r in results]


def test_step_to_mask_result() -> None:
    node = _node()
    try:
        res = [node.process(s)[0] for s in _steps(12)]
    finally:
        node.close()
    for r in res:
        assert isinstance(r, MaskResult)
        assert r.mask.shape == (32, 40) and r.mask.dtype == np.uint8
        assert set(r.layer_spikes) == {"conv1", "conv2", "conv3"}
        assert all(type(v) is int for v in r.layer_spikes.values())
        assert r.model_done_ns >= r.step.closed_ns
        assert r.instances == [] or all(hasattr(i, "bbox") for i in r.instances)
    assert sum(r.layer_spikes["conv3"] for r in res) > 0
    lit = [r for r in res if r.mask.any()]
    assert lit, "a moving bar must produce a mask"
    ys, xs = np.nonzero(lit[-1].mask)
    assert xs.max() - xs.min() < 30  # the mask follows the bar, not the whole frame


def test_batch_equals_stepwise() -> None:
    a, b = _node(), _node()
    try:
        steps = _steps(10)
        one = [a.process(s)[0] for s in steps]
        many = b.process_batch(steps[:3]) + b.process_batch(steps[3:4]) + b.process_batch(steps[4:])
    finally:
        a.close()
        b.close()
    assert _summary(one) == _summary(many)


def test_reset_drops_state_and_passes_on() -> None:
    steps = _steps(8)
    node, fresh = _node(), _node()
    try:
        for s in steps[:5]:
            node.process(s)
        r = StreamReset("loop")
        assert node.process(r) == [r]
        after = [node.process(s)[0] for s in steps[5:]]
        ref = [fresh.process(s)[0] for s in steps[5:]]
        assert _summary(after) == _summary(ref)
        node.reset()
        assert node._enc_state is None and node._win_state is None
    finally:
        node.close()
        fresh.close()


def test_state_carries_without_reset() -> None:
    node = _node(mask_window=1)
    try:
        steps = _steps(6)
        r1 = [node.process(s)[0] for s in steps]
        node.reset()
        r2 = [node.process(s)[0] for s in steps[3:]]
    finally:
        node.close()
    # the same frames give different spikes with and without the history before them
    assert [x.layer_spikes for x in r1[3:]] != [x.layer_spikes for x in r2]


def test_reset_with_new_size_resizes() -> None:
    node = _node()
    try:
        node.process_batch(_steps(3))
        new = SensorSize(24, 20)
        node.process(StreamReset("new file", size=new))
        res = node.process(_steps(3, new)[2])[0]
        assert res.mask.shape == (20, 24)
        with pytest.raises(NodeError, match="StreamReset with the new size"):
            node.process(_steps(1, SIZE)[0])
    finally:
        node.close()


def test_constructor_validates(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="weights file .* not found"):
        build_model_node(_config(), SIZE, 2, "cpu", str(tmp_path / "none.pt"))
    with pytest.raises(UsageError, match="in_channels"):
        build_model_node(_config(), SIZE, 3, "cpu")
    with pytest.raises(UsageError, match="device"):
        build_model_node(_config(), SIZE, 2, "warp-drive")
    with pytest.raises(UsageError, match="too small"):
        build_model_node(_config(), SensorSize(3, 10), 2, "cpu")
    node = build_model_node(_config(), SIZE, 2, "cpu")
    with pytest.raises(NodeError, match="before open"):
        node.process(_steps(1)[0])
    node.close()  # close of an unopened node is fine, and idempotent
    node.close()


@pytest.mark.skipif(importlib.util.find_spec("model.sparse") is None, reason="model/sparse.py not present")
def test_sparse_path_gives_the_dense_masks_spikes_and_instances() -> None:
    dense, sparse = _node(path="dense"), _node(path="sparse")
    assert (dense.path, sparse.path) == ("dense", "sparse")
    try:
        steps = _steps(12)
        a = [dense.process(s)[0] for s in steps]
        b = [sparse.process(s)[0] for s in steps]
    finally:
        dense.close()
        sparse.close()
    assert _summary(a) == _summary(b)
    assert [r.instances for r in a] == [r.instances for r in b]
    assert any(r.instances for r in a)


def test_sparse_path_runs_a_checkpoint_s_adapted_thresholds_like_the_dense_path(tmp_path: Path) -> None:
    """Thresholds come from the loaded encoder (a trained checkpoint may adapt them per
    channel), not from the config: both paths run the same network."""
    from model.checkpoint import save_checkpoint
    from model.encoder import Encoder

    enc = Encoder(_config()["model"], 2)
    with torch.no_grad():
        enc.theta1[1] = 6.0
        enc.theta2[::3] = 7.0
    ck = tmp_path / "adapted.pt"
    save_checkpoint(ck, enc, {"trained": True})
    nodes = {}
    for path in ("dense", "sparse"):
        nodes[path] = build_model_node(_config(path=path), SIZE, 2, "cpu", str(ck))
        nodes[path].open(_ctx())
    plain = _node(path="sparse")
    try:
        steps = _steps(14)
        a, b = nodes["dense"].process_batch(steps), nodes["sparse"].process_batch(steps)
        assert nodes["sparse"]._sparse_model._th[1][0] == 7.0
        assert _summary(a) == _summary(b) and [r.instances for r in a] == [r.instances for r in b]
        assert _summary(plain.process_batch(steps)) != _summary(b)  # the thresholds mattered
    finally:
        for n in (*nodes.values(), plain):
            n.close()


def test_decode_threads_give_the_same_masks_and_instances() -> None:
    """The sparse path's decode split over helper threads == one thread == the dense path."""
    steps = _steps(14)
    nodes = [_node(path="dense")] + [_node(path="sparse", decode_threads=n) for n in (1, 2, 3)]
    try:
        res = [n.process_batch(steps) for n in nodes]
        assert nodes[2]._side is not None and nodes[2]._side.n == 2
    finally:
        for n in nodes:
            n.close()
    # the split needs >= 2 spikes per thread: the bar makes that many on most steps
    assert sum(r.layer_spikes["conv3"] >= 6 for r in res[0]) >= 5
    for r in res[1:]:
        assert _summary(r) == _summary(res[0])
        assert [x.instances for x in r] == [x.instances for x in res[0]]
    assert any(x.instances for x in res[0])


def test_side_threads_run_jobs_in_order_and_raise_helper_errors() -> None:
    from model.side import SideThreads

    side = SideThreads(3)
    try:
        assert side.run([lambda k=k: k * k for k in range(7)]) == [k * k for k in range(7)]

        def boom() -> int:
            raise ValueError("helper failed")

        with pytest.raises(ValueError, match="helper failed"):
            side.run([lambda: 1, boom, lambda: 3])
        assert side.run([lambda: "still works", lambda: 2]) == ["still works", 2]
    finally:
        side.close()
    assert side.run([lambda: 1, lambda: 2]) == [1, 2]  # restarts after close
    side.close()
    with pytest.raises(ValueError, match="threads=0 is not allowed"):
        SideThreads(0)


def test_overlap_gives_the_same_masks_instances_and_counts_across_batches_and_resets() -> None:
    """HULK-SMASH on the helper thread (model.overlap: true) == sequential, whatever the batching."""
    steps = _steps(30)
    seq = _node(path="sparse", overlap=False)
    ovl = _node(path="sparse", overlap=True)
    try:
        assert seq._overlap is None and ovl._overlap is not None
        a = seq.process_batch(steps[:20])
        # batches of 1 (sequential inside), 2 (one overlap) and 17 (many), carried state between
        b = ovl.process_batch(steps[:1]) + ovl.process_batch(steps[1:3]) + ovl.process_batch(steps[3:20])
        assert _summary(a) == _summary(b)
        assert [r.instances for r in a] == [r.instances for r in b]
        assert sum(len(r.instances) for r in a) > 5 and sum(r.layer_spikes["conv3"] for r in a) > 20
        # a reset mid-stream drops the state of both (tracks, history, membranes) the same way
        seq.process(StreamReset("test"))
        ovl.process(StreamReset("test"))
        a2, b2 = seq.process_batch(steps[20:]), ovl.process_batch(steps[20:])
        assert _summary(a2) == _summary(b2) and [r.instances for r in a2] == [r.instances for r in b2]
    finally:
        seq.close()
        ovl.close()
    assert ovl._overlap is None  # the helper thread is stopped


@pytest.mark.parametrize("overlap", [False, True])
def test_sparse_reset_reuses_the_state_and_equals_a_fresh_node(overlap: bool) -> None:
    """A reset keeps the event-driven state's arrays (refilled in place, no new 50+ MB) and
    the next steps give what a new node gives: masks, counts, instances and their ids."""
    steps = _steps(40)
    used = _node(path="sparse", overlap=overlap)
    new = _node(path="sparse", overlap=overlap)
    try:
        used.process_batch(steps[:25])
        st, ist = used._sp_state, used._inst_state
        assert st is not None and st.t == 25 and ist is not None and ist.next_id > 1
        used.process(StreamReset("test"))
        assert used._sp_state is st and used._inst_state is ist  # kept, refilled
        assert st.t == 0 and ist.next_id == 1 and ist.tracks == [] and not ist.hist.any()
        a, b = used.process_batch(steps[25:]), new.process_batch(steps[25:])
        assert _summary(a) == _summary(b) and [r.instances for r in a] == [r.instances for r in b]
        assert sum(len(r.instances) for r in a) > 5
        # a new sensor size: new state, decode buffers and instance state
        small = SensorSize(SIZE.width - 8, SIZE.height - 4)
        used.process(StreamReset("test", size=small))
        out = used.process_batch(_steps(6, small))
        assert used._sp_state is not st and used._sp_state.grid.w == small.width and len(out) == 6
        assert used._inst_state is not ist
    finally:
        used.close()
        new.close()


def test_overlap_helper_error_reaches_the_caller_and_the_node_goes_on(monkeypatch) -> None:
    node = _node(path="sparse", overlap=True)
    steps = _steps(8)
    try:
        calls = {"n": 0}
        real = node._instances_job

        def flaky(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:
                raise ValueError("instances failed")
            return real(*a, **k)

        monkeypatch.setattr(node, "_instances_job", flaky)
        with pytest.raises(ValueError, match="instances failed"):
            node.process_batch(steps[:6])
        assert node._overlap is not None and node._overlap.pending == 0  # the helper is idle again
        node.reset()
        assert len(node.process_batch(steps)) == 8
    finally:
        node.close()


def test_overlap_holds_a_batch_s_last_steps_while_more_is_queued() -> None:
    """``iter_batch(batch, more=...)``: the pipeline runs on across batches (no drain per
    micro-batch, ``OVERLAP_DEPTH`` jobs in flight); the held results come first in the next
    call, from ``flush``, before a reset and before a bad batch's error, and the results
    equal the sequential node's."""
    d = OVERLAP_DEPTH
    assert d >= 1
    steps = _steps(24)
    seq = _node(path="sparse", overlap=False)
    ovl = _node(path="sparse", overlap=True)
    try:
        ref = seq.process_batch(steps)
        got = list(ovl.iter_batch(steps[:5], more=lambda: True))
        assert [r.step.index for r in got] == list(range(5 - d)) and ovl._overlap.pending == d
        got += list(ovl.iter_batch(steps[5:6], more=lambda: True))  # one step: still pipelined
        assert [r.step.index for r in got] == list(range(6 - d)) and ovl._overlap.pending == d
        got += list(ovl.iter_batch(steps[6:12], more=lambda: False))
        assert [r.step.index for r in got] == list(range(12)) and ovl._overlap.pending == 0
        got += list(ovl.iter_batch(steps[12:20], more=lambda: True))
        got += list(ovl.flush())
        assert list(ovl.flush()) == [] and ovl._overlap.pending == 0
        assert _summary(got) == _summary(ref[:20])
        assert [r.instances for r in got] == [r.instances for r in ref[:20]]
        # a reset behind held steps: their results first, in order, then the reset
        list(ovl.iter_batch(steps[20:20 + d + 1], more=lambda: True))
        out = ovl.process(StreamReset("next file"))
        assert [type(o) for o in out] == [MaskResult] * d + [StreamReset]
        assert [o.step.index for o in out[:d]] == list(range(21, 21 + d))
        # a bad batch behind held steps: their results come out, then the error
        list(ovl.iter_batch(steps[:d + 1], more=lambda: True))
        bad = _steps(1, SensorSize(48, 32), start=d + 1)
        it = ovl.iter_batch(bad)
        assert [next(it).step.index for _ in range(d)] == list(range(1, d + 1))
        with pytest.raises(NodeError, match="frame is 2x32x48"):
            next(it)
        # reset() drops held steps with the state: the helper is idle and the node starts afresh
        list(ovl.iter_batch(steps[:d + 1], more=lambda: True))
        ovl.reset()
        assert ovl._overlap.pending == 0 and list(ovl.flush()) == []
        again = list(ovl.iter_batch(steps[:6]))
        assert _summary(again) == _summary(ref[:6])
    finally:
        seq.close()
        ovl.close()


def test_overlap_auto_follows_the_usable_cpus(monkeypatch) -> None:
    import model.config as mcfg

    mc = build(ModelConfig, {"overlap": "auto"})
    monkeypatch.setattr(mcfg, "usable_cpus", lambda: 2)
    assert mc.overlap_enabled() is False
    monkeypatch.setattr(mcfg, "usable_cpus", lambda: 4)
    assert mc.overlap_enabled() is True
    assert build(ModelConfig, {"overlap": True}).overlap_enabled() is True
    with pytest.raises(UsageError, match="model.overlap: 'yes' is not allowed.*auto.*true/false"):
        build(ModelConfig, {"overlap": "yes"}, "model")


@pytest.mark.parametrize("overlap", [False, True])
def test_iter_batch_hands_each_result_on_before_the_batch_is_done(overlap: bool) -> None:
    """The engine forwards results as iter_batch yields them: the first comes after one step
    (1 + OVERLAP_DEPTH with the overlap pipeline, which encodes steps t + 1 .. t + depth
    before step t's instances are in)."""
    steps = _steps(6)
    node = _node(path="sparse", overlap=overlap)
    ref = _node(path="sparse", overlap=False)
    try:
        it = node.iter_batch(steps)
        first = next(it)
        assert first.step.index == 0 and node._sp_state.t == (1 + OVERLAP_DEPTH if overlap else 1)
        rest = list(it)
        assert node._sp_state.t == 6 and [r.step.index for r in rest] == [1, 2, 3, 4, 5]
        assert _summary([first, *rest]) == _summary(ref.process_batch(steps))
        # closed early: the helper is idle and the node goes on from where it stopped
        it = node.iter_batch(_steps(4, start=6))
        next(it)
        it.close()
        assert node._overlap is None or node._overlap.pending == 0
    finally:
        node.close()
        ref.close()


def test_overlap_thread_keeps_order_and_raises_in_the_caller() -> None:
    from model.side import Overlap

    ov = Overlap()
    try:
        for k in range(5):
            ov.submit(lambda k=k: k * k)
        assert [ov.result() for _ in range(5)] == [0, 1, 4, 9, 16]

        def boom() -> int:
            raise ValueError("helper failed")

        ov.submit(boom)
        ov.submit(lambda: "after")
        with pytest.raises(ValueError, match="helper failed"):
            ov.result()
        assert ov.result() == "after"
        with pytest.raises(RuntimeError, match="without a pending job"):
            ov.result()
        ov.submit(boom)
        ov.drain()  # drops the failure: cleanup after an error elsewhere
        assert ov.pending == 0
    finally:
        ov.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda_is_a_node_error() -> None:
    node = build_model_node(_config(), SIZE, 2, "cuda")
    with pytest.raises(NodeError, match="CUDA is not available"):
        node.open(_ctx())


def _binned_steps(n: int, size: SensorSize = SIZE) -> list[Step]:
    """Steps made by the real binner from events of two moving bars (frames and events agree)."""
    from stream.binner import Binner, BinnerConfig
    from stream.events import EventPacket, make_events

    rng = np.random.default_rng(7)
    parts = []
    for t in range(n):
        for x0, y0, v in ((4, 4, 1), (30, 16, -1)):
            x = x0 + v * t % (size.width - 10)
            ys = np.arange(y0, y0 + 12)
            for xx, p in ((x, 1), (x - 2 * v, 0)):
                parts.append(make_events(np.full(len(ys), t * 1000 + 10) + np.arange(len(ys)), np.full(len(ys), xx % size.width), ys, np.full(len(ys), p)))
        k = 8
        parts.append(make_events(np.full(k, t * 1000 + 500), rng.integers(0, size.width, k), rng.integers(0, size.height, k), rng.integers(0, 2, k)))
    ev = np.concatenate(parts)
    ev = ev[np.argsort(ev["timestamp"], kind="stable")]
    b = Binner(build(BinnerConfig, {"bin_us": 1000}), size)
    out = [s for s in b.process(EventPacket(ev, size)) if isinstance(s, Step)]
    return out + b.flush()


def test_windowed_batches_equal_stepwise_with_instances_and_conv3_firing() -> None:
    """Dense window (the CUDA batching, forced on CPU) == dense per step == sparse, instances on."""
    steps = _steps(14)
    ref, win = _node(path="dense"), ModelNode(_config(path="dense"), SIZE, 2, "cpu", batch_mode="window")
    win.open(_ctx())
    sparse = _node(path="sparse")
    try:
        a = [ref.process(s)[0] for s in steps]
        b = win.process_batch(steps[:5]) + win.process_batch(steps[5:6]) + win.process_batch(steps[6:])
        c = sparse.process_batch(steps)
    finally:
        for n in (ref, win, sparse):
            n.close()
    assert _summary(a) == _summary(b) == _summary(c)
    assert [r.instances for r in a] == [r.instances for r in b] == [r.instances for r in c]
    assert sum(r.layer_spikes["conv3"] for r in a) > 20 and sum(len(r.instances) for r in a) > 5


def test_cuda_window_recipe_on_cpu_equals_stepwise() -> None:
    """The CUDA window path as it runs there (neuron scans compiled by torch.compile, full-frame
    joint decode), forced on CPU: the same masks, counts and instances as the per-step path,
    across a full 16-step chunk, padded chunks and a reset."""
    steps = _steps(21)
    ref = _node(path="dense")
    win = ModelNode(_config(path="dense", compile=True), SIZE, 2, "cpu", batch_mode="window", dense_decode="full")
    win.open(_ctx())
    try:
        assert win._scan is not None  # compiled and verified against eager at open
        a = [ref.process(s)[0] for s in steps]
        b = win.process_batch(steps[:16]) + win.process_batch(steps[16:19]) + win.process_batch(steps[19:])
        ref.reset()
        win.reset()
        a += [ref.process(s)[0] for s in steps[:7]]
        b += win.process_batch(steps[:7])
    finally:
        ref.close()
        win.close()
    assert _summary(a) == _summary(b)
    assert [r.instances for r in a] == [r.instances for r in b]
    assert sum(r.layer_spikes["conv3"] for r in a) > 20 and sum(r.layer_spikes["conv1"] for r in a) > 100


def test_compile_true_needs_the_window_path() -> None:
    with pytest.raises(UsageError, match="model.compile: true compiles the dense window path"):
        ModelNode(_config(path="sparse", compile=True), SIZE, 2, "cpu")
    # auto stays eager on CPU, where the window path is not the default
    node = ModelNode(_config(path="dense"), SIZE, 2, "cpu", batch_mode="window")
    assert node._compile is False


def test_compile_failure_is_an_error_with_true_and_a_warning_with_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that cannot compile (or a kernel that differs from eager) at open: ``true`` stops
    with one line; ``auto`` (what CUDA runs) warns and runs the window eager, same results."""
    from model import fused

    def broken(*_a, **_k):
        raise RuntimeError("no compiler backend here\nlong backend log")

    monkeypatch.setattr(fused, "verify", broken)
    strict = ModelNode(_config(path="dense", compile=True), SIZE, 2, "cpu", batch_mode="window")
    with pytest.raises(NodeError, match=r"compiled neuron scan failed on cpu: no compiler backend here; set model.compile: false$"):
        strict.open(_ctx())
    node = ModelNode(_config(path="dense"), SIZE, 2, "cpu", batch_mode="window")
    node._compile = True  # auto's decision on CUDA
    with pytest.warns(RuntimeWarning, match="model.compile: auto: .*no compiler backend here.*running it eager"):
        node.open(_ctx())
    ref = _node(path="dense")
    try:
        assert node._scan is None
        steps = _steps(6)
        assert _summary(node.process_batch(steps)) == _summary([ref.process(s)[0] for s in steps])
    finally:
        node.close()
        ref.close()


def test_sparse_reads_events_when_they_match_the_frame() -> None:
    steps = _binned_steps(16)
    assert sum(s.n_events for s in steps) > 100
    dense, sparse = _node(path="dense"), _node(path="sparse")
    try:
        a = dense.process_batch(steps)
        b = sparse.process_batch(steps)
        assert sparse._events_ok is True  # the events path was taken
        # a stream whose events do not describe the frame falls back to the frame
        sparse.process(StreamReset("new"))
        odd = [Step(s.index, s.t0_us, s.t1_us, s.frame, s.events[: len(s.events) // 2], s.size, s.closed_ns) for s in steps]
        c = sparse.process_batch(odd)
        assert sparse._events_ok is False
    finally:
        dense.close()
        sparse.close()
    assert _summary(a) == _summary(b) == _summary(c)
    assert sum(r.layer_spikes["conv3"] for r in a) > 0


def test_adaptation_hook_updates_quantized_weights_and_saves(tmp_path: Path) -> None:
    from model.checkpoint import read_checkpoint
    from stream.config import load_config

    save = tmp_path / "adapted.pt"
    cfg = load_config(None, None, {
        "model": {"conv1_gain": 40.0, "path": "auto"},
        "adapt": {"enabled": True, "every_n_steps": 1, "max_share": 1.0, "save_weights": str(save)},
    })
    node = build_model_node(cfg, SIZE, 2, "cpu")
    assert node.path == "dense"  # auto + adapt -> dense (the adapter updates the torch weights)
    node.open(_ctx())
    w0 = node.encoder.w2.clone()
    try:
        res = node.process_batch(_steps(20))
        node.reset()
        res += node.process_batch(_steps(5))
        w2 = node.encoder.w2
        assert res[-1].extra["adapt.updates"] > 0 and not torch.equal(w2, w0)
        assert torch.equal(w2, torch.round(w2 * 4096) / 4096)  # still on the 2^-12 grid
    finally:
        node.close()
    assert torch.equal(read_checkpoint(save).w2, w2)
    with pytest.raises(UsageError, match="dense"):
        build_model_node(cfg.replace("model", path="sparse"), SIZE, 2, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_give_identical_masks() -> None:
    """CUDA dense (windowed micro-batches, TF32 off) == CPU sparse: masks, counts, instances."""
    cpu, gpu = build_model_node(_config(path="auto"), SIZE, 2, "cpu"), build_model_node(_config(path="auto"), SIZE, 2, "cuda")
    cpu.open(_ctx())
    gpu.open(_ctx())
    assert (cpu.path, gpu.path) == ("sparse", "dense")
    try:
        steps = _steps(15)
        a = [cpu.process(s)[0] for s in steps]
        gsteps = [Step(s.index, s.t0_us, s.t1_us, s.frame.cuda(), s.events, s.size, s.closed_ns) for s in steps]
        b = gpu.process_batch(gsteps[:7]) + [gpu.process(s)[0] for s in gsteps[7:9]] + gpu.process_batch(gsteps[9:])
    finally:
        cpu.close()
        gpu.close()
    assert _summary(a) == _summary(b)
    assert [r.instances for r in a] == [r.instances for r in b]


def test_overlap_in_the_pipeline_gives_every_step_the_sequential_result() -> None:
    """The engine + real node with model.overlap: true (results held across micro-batches and
    flushed at the end) == overlap off: one result per step, same masks and instances."""
    from stream.config import load_config
    from stream.engine import run_pipeline
    from stream.node import SinkNode
    from stream.registry import build_source

    class Keep(SinkNode):
        name = "keep"

        def __init__(self) -> None:
            self.items: list[MaskResult] = []

        def process(self, item) -> None:
            if isinstance(item, MaskResult):
                self.items.append(item)

    runs = []
    for overlap in (False, True):
        cfg = load_config(None, None, {
            "synthetic": {"duration_s": 0.3, "width": 96, "height": 72},
            "model": {"path": "sparse", "overlap": overlap},
            "engine": {"status_s": 0, "device": "cpu", "max_batch": 8},
        })
        sink = Keep()
        summary = run_pipeline(cfg, build_source("synthetic", cfg), [sink])
        assert summary.error is None and summary.steps == 300 and len(sink.items) == 300
        runs.append(sink.items)
    seq, ovl = runs
    assert [r.step.index for r in ovl] == list(range(300))
    assert _summary(seq) == _summary(ovl) and [r.instances for r in seq] == [r.instances for r in ovl]
    assert sum(len(r.instances) for r in ovl) > 0


def test_cpu_dense_joint_mask_picks_the_cheaper_decoder_with_the_same_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """dense_decode="auto" on CPU decodes a step by per-spike crops when it has few Conv3 spikes
    for its pixels and full frame otherwise (model.node.CROP_PIXELS_PER_SPIKE); either way the
    masks equal those of a node forced to one decoder, stepwise and in windows."""
    import model.node as node_mod

    steps = _steps(12)  # 0, 40 .. 64 Conv3 spikes per step at 40x32
    shape = torch.Size((1, 1, SIZE.height // 4, SIZE.width // 4))
    px = SIZE.height * SIZE.width
    auto = _node(path="dense")
    # a break-even between these steps' counts (1,280 px / 25 = 51 spikes), so auto uses both
    monkeypatch.setattr(node_mod, "CROP_PIXELS_PER_SPIKE", 25)
    per = node_mod.CROP_PIXELS_PER_SPIKE
    assert auto._use_full_decode(shape, -(-px // per))  # many spikes for the pixels: full frame
    assert not auto._use_full_decode(shape, px // per - 1)  # few: crops
    assert not auto._use_full_decode(torch.Size((3, *shape[1:])), px // per)  # a window's 3 rows
    assert not auto._use_full_decode(torch.Size((1, 2, *shape[2:])), px // per)  # 2 classes: a map each
    runs = {}
    for decode in ("crops", "full"):
        node = ModelNode(_config(path="dense"), SIZE, 2, "cpu", dense_decode=decode)
        node.open(_ctx())
        assert node._use_full_decode(shape, 1) == (decode == "full")
        try:
            runs[decode] = [node.process(s)[0] for s in steps]
        finally:
            node.close()
    used: list[str] = []
    for name in ("decode_mask", "decode_mask_crops"):
        real = getattr(node_mod, name)
        monkeypatch.setattr(node_mod, name, lambda *a, _r=real, _n=name, **k: (used.append(_n), _r(*a, **k))[1])
    win = ModelNode(_config(path="dense"), SIZE, 2, "cpu", batch_mode="window")
    win.open(_ctx())
    try:
        a = [auto.process(s)[0] for s in steps]
        assert used.count("decode_mask_crops") >= 3 and used.count("decode_mask") >= 3
        b = win.process_batch(steps)
    finally:
        auto.close()
        win.close()
    assert sum(r.layer_spikes["conv3"] for r in a) > 20
    assert _summary(a) == _summary(runs["crops"]) == _summary(runs["full"]) == _summary(b)
    assert [r.instances for r in a] == [r.instances for r in runs["crops"]] == [r.instances for r in b]
