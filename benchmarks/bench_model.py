"""(b) Model steps/s (encoder + decoder + instances), (c) peers, (g) CUDA; MACs and bytes per step.

The model is the real node (:func:`model.node.build_model_node`, default config, the
shipped weights), fed pre-binned :class:`Step` items through ``process_batch``: the
same call the engine makes.  One measurement = reset, then ``n`` consecutive steps from
the start of the input (state evolves identically in every repeat).  ``n`` is chosen
from the warm-up rate so one repeat takes about ``budget_s`` (at least 20 steps), so
that a slow dense path at 640x480 does not take minutes while a fast sparse path is
still timed over hundreds of steps.

Spike counts per layer (mean per step) come from the node's own ``layer_spikes``, so
the sparsity behind each figure is printed next to it.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from stream.config import Config, load_config
from stream.events import SensorSize, Step
from stream.metrics import Metrics
from stream.node import RunContext

from . import inputs, peers
from .common import BenchSettings, Results, Row, Stat, measure_rate

RESOLUTIONS = (SensorSize(128, 128), SensorSize(346, 260), SensorSize(640, 480))
CUDA_RESOLUTIONS = (SensorSize(640, 480), SensorSize(1280, 720))
DENSITIES = (0.001, 0.01, 0.05)
TARGET_SCENE_346 = 2000.0
TARGET_PEER_RATIO = 10.0
TARGET_CUDA_640 = 20000.0


# ----------------------------------------------------------------------------- analytic
def macs_bytes(size: SensorSize, c_in: int = 2, n_classes: int = 1) -> dict[str, float]:
    """Dense MACs and a lower bound of bytes moved per step (fp32), per stage.

    MACs (multiply-accumulates) of a same-padded conv = H_out W_out C_out C_in K^2; the
    tied decoder's transposed convs cost the same as the forward ones (per class).
    Bytes: every membrane is read and written once (8 B per neuron), every current is
    written by the conv and read by the neuron (8 B), spikes written and read (8 B), the
    first-spike int32 maps read and written (8 B), the input frame read (4 B per value).
    Caches do not hold 346x260x4 channels x several maps (≈ 10 MB per map set), so
    these bytes go to DRAM at least once per step.
    """
    h, w = size.height, size.width
    h2, w2, h4, w4 = h // 2, w // 2, h // 4, w // 4
    m1 = h * w * 4 * c_in * 25
    m2 = h2 * w2 * 36 * 4 * 25
    m3 = h4 * w4 * n_classes * 36 * 49
    neurons = h * w * 4 + h2 * w2 * 36 + h4 * w4 * n_classes
    bytes_ = neurons * (8 + 8 + 8 + 8) + h * w * c_in * 4
    return {
        "conv1_mmac": m1 / 1e6, "conv2_mmac": m2 / 1e6, "conv3_mmac": m3 / 1e6,
        "encoder_mmac": (m1 + m2 + m3) / 1e6, "decoder_mmac": (m1 + m2 + m3) * n_classes / 1e6,
        "neurons": float(neurons), "mbytes_min": bytes_ / 1e6,
    }


# ----------------------------------------------------------------------------- node
def model_config(**model_changes: Any) -> Config:
    cfg = load_config()
    return cfg.replace("model", **model_changes) if model_changes else cfg


def open_node(cfg: Config, size: SensorSize, device: str = "cpu"):  # type: ignore[no-untyped-def]
    """The model node, built and opened the way the engine does it."""
    from model.node import build_model_node

    node = build_model_node(cfg, size, cfg["binner"].channels, device)
    node.open(RunContext(stop=threading.Event(), metrics=Metrics()))
    return node


def steps_to(steps: list[Step], device: str) -> list[Step]:
    if device == "cpu":
        return steps
    out = []
    for s in steps:
        out.append(Step(s.index, s.t0_us, s.t1_us, s.frame.to(device), s.events, s.size, s.closed_ns, s.labels, s.source))
    torch.cuda.synchronize()
    return out


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def time_node(node: Any, steps: list[Step], settings: BenchSettings, budget_s: float = 0.6) -> tuple[Stat, dict[str, float], int]:
    """(steps/s, mean spikes per step per layer, steps per repeat) for ``node`` over ``steps``."""
    dev = str(node.device.type)
    warm_n = min(len(steps), 5 if settings.tiny else 20)
    node.reset()
    t0 = time.perf_counter()
    node.process_batch(steps[:warm_n])
    _sync(dev)
    rate0 = warm_n / max(time.perf_counter() - t0, 1e-9)
    n = len(steps) if settings.tiny else int(min(len(steps), max(20, rate0 * budget_s)))
    run = steps[:n]
    node.reset()
    res = node.process_batch(run)  # untimed pass for the spike counts
    spikes = {k: float(np.mean([r.layer_spikes.get(k, 0) for r in res])) for k in ("conv1", "conv2", "conv3")}
    spikes["events_in"] = float(np.mean([s.n_events for s in run]))

    # fed as the engine feeds it: micro-batches of up to engine.max_batch queued steps, results
    # handed on (dropped here) instead of all kept (keeping every mask of a repeat made each new
    # mask fresh memory: ~5 % of a sparse step in page faults that the pipeline does not pay)
    mb = load_config()["engine"].max_batch

    def work() -> float:  # node.reset() before each call, untimed (measure_rate's setup)
        for i in range(0, n, mb):
            # more steps queued behind this batch, as the engine tells the node (``more``)
            for _ in node.iter_batch(run[i:i + mb], more=lambda i=i: i + mb < n):
                pass
        for _ in node.flush():
            pass
        _sync(dev)
        return float(n)

    return measure_rate(work, settings, setup=node.reset), spikes, n


def _row_extra(spikes: dict[str, float], n: int, **more: Any) -> dict[str, Any]:
    return {"spikes_per_step": {k: round(v, 1) for k, v in spikes.items()}, "steps_per_repeat": n, **more}


def _spk(spikes: dict[str, float]) -> str:
    return f"ev {spikes['events_in']:.0f} s1 {spikes['conv1']:.0f} s2 {spikes['conv2']:.0f} s3 {spikes['conv3']:.1f}"


# ----------------------------------------------------------------------------- profile
def profile_dense(node: Any, steps: list[Step]) -> dict[str, float]:
    """Per-stage ms/step of the dense path, stage by stage with the model's own functions.

    Mirrors :func:`model.encoder.encoder_step` and the node's decode/window/counts with a
    timer around each stage (``perf_counter``; CPU ops are synchronous).
    """
    from model.decoder import decode_mask, window_step
    from model.encoder import _first_spike
    from model.neurons import neuron_step

    enc = node.encoder
    mc = node.mc
    p1, p2, p3 = enc.params()
    acc: dict[str, float] = {}

    def tick(name: str, t: float) -> float:
        now = time.perf_counter()
        acc[name] = acc.get(name, 0.0) + (now - t)
        return now

    n1 = n2 = n3 = None
    f = [None, None, None]
    win = None
    with torch.inference_mode():
        for k, s in enumerate(steps):
            t = time.perf_counter()
            x = enc.prepare_input(s.frame)
            t = tick("input", t)
            i1 = F.conv2d(x, enc.w1, padding=2)
            t = tick("conv1", t)
            s1, n1 = neuron_step(i1, n1, p1)
            t = tick("lif1", t)
            pool1, idx1 = F.max_pool2d(s1, 2, stride=2, return_indices=True)
            t = tick("pool1", t)
            i2 = F.conv2d(pool1, enc.w2, padding=2)
            t = tick("conv2", t)
            s2, n2 = neuron_step(i2, n2, p2)
            t = tick("lif2", t)
            pool2, idx2 = F.max_pool2d(s2, 2, stride=2, return_indices=True)
            t = tick("pool2", t)
            i3 = F.conv2d(pool2, enc.w3, padding=3)
            t = tick("conv3", t)
            s3, n3 = neuron_step(i3, n3, p3)
            t = tick("if3", t)
            f = [_first_spike(f[0] if f[0] is not None else torch.full_like(s1, -1, dtype=torch.int32), s1, k),
                 _first_spike(f[1] if f[1] is not None else torch.full_like(s2, -1, dtype=torch.int32), s2, k),
                 _first_spike(f[2] if f[2] is not None else torch.full_like(s3, -1, dtype=torch.int32), s3, k)]
            t = tick("first_spike_maps", t)
            from model.encoder import EncoderOutput

            out = EncoderOutput(s3, (idx1, idx2), (s1.shape[-2:], s2.shape[-2:]),
                                {"conv1": s1, "pool1": pool1, "conv2": s2, "pool2": pool2, "conv3": s3}, {}, s3.sum() > 0, s3.sum())
            if bool(out.has_spikes):
                raw = decode_mask(out, enc.w1, enc.w2, enc.w3, mc.decoder_gate, mc.decoder_threshold)[0]
            else:
                raw = torch.zeros(x.shape[-2:], dtype=torch.uint8)
            t = tick("decoder (when S3 fired)", t)
            mask, win = window_step(raw, win, mc.mask_window, mc.mask_window_mode, mc.mask_decay, mc.n_classes)
            t = tick("mask window", t)
            _ = torch.stack([s1.sum(), s2.sum(), s3.sum()]).tolist(), mask.numpy()
            t = tick("counts + mask to host", t)
    return {k: 1e3 * v / len(steps) for k, v in acc.items()}


def profile_sparse(node: Any, steps: list[Step]) -> dict[str, float] | None:
    """ms/step of the event-driven kernels alone (``model/sparse.py``), when present."""
    try:
        from model.sparse import SparseSpikeSEG
    except ImportError as e:
        if "model.sparse" in str(e) or "No module named 'model.sparse'" in str(e):
            return None
        raise
    sp = SparseSpikeSEG.from_encoder(node.encoder)
    st = None
    st, _ = None, None
    out, st = sp.step(steps[0].frame, None)
    t0 = time.perf_counter()
    for s in steps[1:]:
        out, st = sp.step(None, st, events=s.events)
    dt = time.perf_counter() - t0
    return {"sparse kernels (encoder+decoder, events in)": 1e3 * dt / max(1, len(steps) - 1)}


# ----------------------------------------------------------------------------- runs
def run(results: Results, settings: BenchSettings, cuda: bool = False) -> None:
    """(b) and (c) on CPU; with ``cuda`` (g): the same model rows on the GPU."""
    dev = "cuda" if cuda else "cpu"
    sec = "g cuda model" if cuda else "b model"
    res_list = CUDA_RESOLUTIONS if cuda else RESOLUTIONS
    if settings.tiny:
        res_list = (SensorSize(64, 48),)
    n_steps = 12 if settings.tiny else 400
    # On CUDA the dense path is the design (the event-driven kernels are CPU numba).
    cfg = model_config(path="dense") if cuda else model_config()
    peer_size = res_list[0] if settings.tiny else SensorSize(346, 260)
    for size in res_list:
        mb = macs_bytes(size, cfg["binner"].channels, cfg["model"].n_classes)
        results.notes.append(
            f"{size}: dense encoder {mb['encoder_mmac']:.0f} MMAC + decoder {mb['decoder_mmac']:.0f} MMAC per step; "
            f"{mb['neurons'] / 1e6:.2f} M neurons; >= {mb['mbytes_min']:.0f} MB moved per dense step"
        )
        # built-in scene
        ev, which = inputs.scene_events(cfg, size, n_steps)
        steps = steps_to(inputs.bin_steps(ev, size), dev)
        node, cfg = _working_node(results, cfg, size, dev, steps)
        st, spikes, n = time_node(node, steps, settings)
        target = None
        if not cuda and size == SensorSize(346, 260):
            target = TARGET_SCENE_346
        if cuda and size == SensorSize(640, 480):
            target = TARGET_CUDA_640
        results.add(Row(sec, f"scene {size} [{_spk(spikes)}]", st, "steps/s",
                        f">= {target:g}" if target else "", target, extra=_row_extra(spikes, n, scene=which, path=cfg['model'].path)))
        if not cuda and size == peer_size:
            # the same node with HULK-SMASH overlapped on a helper thread (model.overlap: true):
            # both cores to the model, as here where nothing else runs; the pipeline's default
            # (auto) keeps it off on 2 cores, where the source and sinks need the second one
            ocfg = cfg.replace("model", overlap=True)
            onode = open_node(ocfg, size, dev)
            ost, ospikes, on = time_node(onode, steps, settings)
            onode.close()
            results.add(Row(sec, f"scene {size}, model.overlap: true (2 threads) [{_spk(ospikes)}]", ost, "steps/s",
                            f">= {target:g}" if target else "", target,
                            extra=_row_extra(ospikes, on, scene=which, path=cfg['model'].path, overlap=True)))
        if not settings.tiny and not cuda and size == SensorSize(346, 260):
            _profiles(results, cfg, node, steps[:200], "scene")
        # uniform noise
        for d in DENSITIES:
            ev = inputs.noise_events(size, d, min(n_steps, 150))
            steps = steps_to(inputs.bin_steps(ev, size), dev)
            st, spikes, n = time_node(node, steps, settings)
            results.add(Row(sec, f"noise {d * 100:g}% {size} [{_spk(spikes)}]", st, "steps/s", extra=_row_extra(spikes, n)))
            if not cuda and size == peer_size and d == 0.01:
                run_peers(results, settings, node, steps, st, "noise 1%", targets=True)
                if not settings.tiny:
                    _profiles(results, cfg, node, steps[:100], "noise 1%")
        if not cuda and size == peer_size:
            ev, _ = inputs.scene_events(cfg, size, n_steps)
            steps = inputs.bin_steps(ev, size)
            st_scene = results.rows[[r.name.startswith(f"scene {size}") and r.section == sec for r in results.rows].index(True)].stat
            run_peers(results, settings, node, steps, st_scene, "scene", targets=False)
        node.close()
    # real recordings (native sizes)
    recs = inputs.real_recordings()
    if not recs:
        results.skip(sec, "real recordings", f"{inputs.REAL_DIR} not found")
    if settings.tiny:  # the smallest recording only
        recs = sorted(recs, key=lambda p: p.stat().st_size)[:1]
    for path in recs:
        ev, size = inputs.read_aedat4(path, max_us=(12 if settings.tiny else n_steps) * 1000, skip_us=0)
        if size.width < 4 or size.height < 4:
            results.skip(sec, path.name, f"sensor {size} too small")
            continue
        steps = steps_to(inputs.bin_steps(ev, size), dev)
        node, cfg = _working_node(results, cfg, size, dev, steps)
        st, spikes, n = time_node(node, steps, settings)
        results.add(Row(sec, f"real {path.stem[:20]} {size} [{_spk(spikes)}]", st, "steps/s", extra=_row_extra(spikes, n)))
        node.close()


def _working_node(results: Results, cfg: Config, size: SensorSize, dev: str, steps: list[Step]):  # type: ignore[no-untyped-def]
    """Open the node and run two steps; if HULK-SMASH (model/instances.py) fails, say so and go on without it.

    The instances module is written in parallel with this bench; a broken call site must
    not hide every other figure.  The failure is reported in the notes, never silent.
    """
    node = open_node(cfg, size, dev)
    try:
        node.process_batch(steps[:2])
        return node, cfg
    except Exception as e:  # noqa: BLE001 - reported below, then measured without instances
        if not cfg["model"].instances:
            raise
        node.close()
        results.notes.append(f"model node failed with instances on ({type(e).__name__}: {e}); model rows measured with instances: false")
        cfg = cfg.replace("model", instances=False)
        return open_node(cfg, size, dev), cfg


def _profiles(results: Results, cfg: Config, node: Any, steps: list[Step], label: str) -> None:
    """Where the time goes at 346x260: dense stages, sparse kernels, node overhead."""
    dense_node = open_node(cfg.replace("model", path="dense"), node.size)
    prof = profile_dense(dense_node, steps)
    dense_node.close()
    total = sum(prof.values())
    for k, v in prof.items():
        results.add(Row("b profile 346x260", f"{label}: dense {k}", Stat(v, v, v, 1), "ms/step",
                        extra={"share": round(v / total, 3) if total else None}))
    sp = profile_sparse(node, steps)
    if sp is None:
        results.skip("b profile 346x260", f"{label}: sparse kernels", "model/sparse.py not present")
    else:
        for k, v in sp.items():
            results.add(Row("b profile 346x260", f"{label}: {k}", Stat(v, v, v, 1), "ms/step"))


def run_peers(results: Results, settings: BenchSettings, node: Any, steps: list[Step], ours: Stat, label: str, targets: bool) -> None:
    """(c) Peers on the same steps: equality with our node checked first, then timed; ratio printed."""
    sec = f"c peers {node.size}"
    try:
        p = peers.params_from_encoder(node.encoder)
    except ValueError as e:
        results.skip(sec, "all peers", str(e))
        return
    n_eq = min(len(steps), 12 if settings.tiny else 60)
    node.reset()
    ref = node.process_batch(steps[:n_eq])
    built, missing = peers.build_peers(p)
    for name, why in missing.items():
        results.skip(sec, f"{label}: {name}", why)
    frames = [s.frame for s in steps]
    for peer in built:
        peer.reset()
        diff = peers.compare(peer.run(frames[:n_eq]), [r.mask for r in ref], [r.layer_spikes for r in ref])
        equal = diff["steps_with_count_mismatch"] == 0 and diff["mask_pixels_differing"] == 0
        # Time the peer over a block sized like ours but capped: dense peers run ~1-2 % of our speed.
        n = len(frames) if settings.tiny else min(len(frames), 30)
        block = frames[:n]

        def work(peer: Any = peer, block: list[Any] = block) -> float:
            peer.run(block)
            return float(len(block))

        # reset untimed, as for our node (time_node)
        st = measure_rate(work, BenchSettings(repeats=min(settings.repeats, 3), warmup=settings.warmup, tiny=settings.tiny),
                          setup=peer.reset)
        results.add(Row(sec, f"{label}: {peer.name}", st, "steps/s", extra={"equal_to_ours": equal, **diff}))
        ratio = ours.median / st.median if st.median > 0 else math.nan
        rs = Stat(ratio, ours.min / st.max if st.max else math.nan, ours.max / st.min if st.min else math.nan, st.n)
        tgt = TARGET_PEER_RATIO if targets and peer.name != peers.SnnTorchPeer.name else None
        results.add(Row(sec, f"{label}: ours / {peer.name}{'' if equal else ' (OUTPUTS DIFFER)'}", rs, "x",
                        f">= {tgt:g}" if tgt else "", tgt, extra={"equal_to_ours": equal}))


# ----------------------------------------------------------------------------- CUDA proxy
def host_ops(results: Results, settings: BenchSettings) -> None:
    """(g) without a GPU: host-side torch ops per step of the CUDA window recipe, run on CPU.

    A GPU step of the dense path is bound by its launches (each op ~5-10 us of host time,
    ~1-3 us of GPU work at 640x480; measured flat 651-1,002 steps/s from 320x240 to 1280x720
    on a lent H100), so the op count per step is the figure a CPU can check.  Counted with
    ``torch.profiler`` over one 16-step window of the built-in scene (top-level ``aten`` ops;
    a compiled region counts once per call), at 160x120: the count does not depend on size.
    Rows: the eager neuron loop with the per-spike crop decode (the CUDA recipe until the
    sixth pass) and the recipe the node runs on CUDA now (``model.compile`` scans, full-frame
    joint decode), instances off and on (T = 16 rows per window, ``engine.max_batch``).
    """
    import dataclasses

    from torch.profiler import ProfilerActivity, profile

    from model.node import ModelNode

    size = SensorSize(64, 48) if settings.tiny else SensorSize(160, 120)
    cfg = model_config(path="dense")
    ev, _ = inputs.scene_events(cfg, size, 60)
    steps = inputs.bin_steps(ev, size)
    t_n = 16  # engine.max_batch: the window the engine hands the node under load
    for inst_on in (False,) if settings.tiny else (False, True):  # tiny (tests): one compilation
        for decode, comp in (("crops", False), ("full", True)):
            mc = dataclasses.replace(cfg["model"], instances=inst_on, compile=comp)
            node = ModelNode(mc, size, cfg["binner"].channels, "cpu", batch_mode="window", dense_decode=decode)
            node.open(RunContext(stop=threading.Event(), metrics=Metrics()))
            node.process_batch(steps[:t_n])
            node.process_batch(steps[t_n : 2 * t_n])
            window = steps[2 * t_n : 3 * t_n]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                res = node.process_batch(window)
            node.close()
            top = [e for e in prof.events() if e.cpu_parent is None]
            n_ops = sum(1 for e in top if e.name.startswith("aten::") or "Compiled" in e.name)
            s3 = float(np.mean([r.layer_spikes["conv3"] for r in res]))
            label = "compiled scans, full decode" if comp else "eager scans, crop decode"
            results.add(Row("g cuda model", f"CUDA recipe ops/step (CPU), inst {'on' if inst_on else 'off'}, {label}",
                            Stat.of([n_ops / len(res)]),
                            "ops/step", higher_better=False, extra={"size": str(size), "conv3_per_step": round(s3, 1)}))
