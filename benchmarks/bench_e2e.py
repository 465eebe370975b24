"""(d) Replay throughput .aedat4 -> masks on ZeroMQ, (e) live latency at 1 ms bins.

Both run the real engine (:func:`stream.engine.run_pipeline`) with the real
``aedat4``/``synthetic`` source and the real ``zmq`` publisher, and a subscriber in
**another process** (``python -m benchmarks.subscriber_proc``) that stamps each message
with ``time.perf_counter_ns()``.  On Linux that clock is CLOCK_MONOTONIC, shared by all
processes of the machine, so "bin close (publisher process) -> received (subscriber
process)" is one subtraction.  A spy sink in the pipeline records each step's
``closed_ns`` and the time it got the mask.

Replay throughput is ``events / (last mask handed to the sinks - first bin closed)``:
the engine's open/close (child reader process, subscriber hand-shake) is excluded, and
reported separately as the wall time of the whole run.  Two files are written with
dv-processing into a temp dir: the built-in scene at 346x260 (realistic, the model
matters) and a dense 20 Mev/s stream (the pipeline matters).  "When the model is not
the bottleneck" is measured with a pass-through model (``model_factory``) that returns
an empty mask per step, so the figure is source + binner + queues + publisher.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from stream.config import Config, load_config
from stream.events import MaskResult, SensorSize, StreamReset
from stream.node import RunContext, SinkNode, Transform

from . import inputs
from .common import BenchSettings, Results, Row, Stat

TARGET_REPLAY_MEVS = 20.0
TARGET_P99_MS = 6.0
_CACHE = Path(tempfile.gettempdir()) / "spikestream-bench"


class SpySink(SinkNode):
    """Records (step index, closed_ns, received_ns, n_events) for every mask; sees everything."""

    name = "spy"
    queue_policy = "block"
    queue_capacity = 4096

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int, int]] = []

    def process(self, item: MaskResult | StreamReset) -> None:
        if isinstance(item, MaskResult):
            self.rows.append((item.step.index, item.step.closed_ns, time.perf_counter_ns(), item.step.n_events))


class NullModel(Transform):
    """Pass-through model: an empty mask per step (measures everything but the network)."""

    name = "model"

    def __init__(self, cfg: Config, size: SensorSize, in_channels: int, device: Any, weights: Any = None) -> None:
        self.size = size

    def process(self, item: Any) -> list[Any]:
        if isinstance(item, StreamReset):
            if item.size is not None:
                self.size = item.size
            return [item]
        return self.process_batch([item])

    def process_batch(self, steps: list[Any]) -> list[MaskResult]:
        out = []
        for s in steps:
            out.append(MaskResult(step=s, mask=np.zeros((s.size.height, s.size.width), np.uint8), model_done_ns=time.perf_counter_ns()))
        return out


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def write_aedat4(path: Path, events: np.ndarray, size: SensorSize, batch_us: int = 1000) -> Path:
    """Events-only ``.aedat4`` through dv-processing's writer, one packet per ``batch_us``.

    dv-processing 2.0.4 has no numpy -> EventStore constructor, so stores are filled with
    ``push_back`` (about 1 Mev/s); files are cached in the temp dir by content key.
    """
    import dv_processing as dv

    tmp = path.with_suffix(".part.aedat4")
    writer = dv.io.MonoCameraWriter(str(tmp), dv.io.MonoCameraWriter.EventOnlyConfig("BENCH", (size.width, size.height)))
    t = events["timestamp"]
    edges = np.arange(int(t[0]), int(t[-1]) + batch_us + 1, batch_us)
    cuts = np.searchsorted(t, edges)
    ts, xs, ys, ps = t.tolist(), events["x"].tolist(), events["y"].tolist(), events["polarity"].tolist()
    for a, b in zip(cuts[:-1], cuts[1:]):
        if b <= a:
            continue
        store = dv.EventStore()
        for i in range(a, b):
            store.push_back(ts[i], xs[i], ys[i], bool(ps[i]))
        writer.writeEvents(store)
    del writer  # the destructor writes the index table
    os.replace(tmp, path)
    return path


def _subscriber(endpoint: str, out: Path, idle_s: float) -> subprocess.Popen:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "benchmarks.subscriber_proc", endpoint, str(out), str(idle_s)], env=env, cwd=root)


def _run(cfg: Config, source: Any, spy: SpySink, endpoint: str, tmp: Path, model_factory: Any = None,
         duration_s: float | None = None) -> tuple[Any, dict[int, int]]:
    """One engine run with zmq + spy sinks and a subscriber process; returns (summary, {step: recv_ns})."""
    from stream.engine import run_pipeline
    from stream.registry import build_sink

    out = tmp / "sub.json"
    out.unlink(missing_ok=True)
    proc = _subscriber(endpoint, out, idle_s=3.0)
    try:
        zcfg = cfg.replace("zmq", endpoint=endpoint, wait_subscribers=1, hwm=100_000)
        zsink = build_sink(f"zmq:{endpoint}", zcfg)
        summary = run_pipeline(zcfg, source, [zsink, spy], duration_s=duration_s, run_dir=tmp / "run",
                               model_factory=model_factory)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    recv = {}
    if out.is_file():
        recv = {int(k): int(v) for k, v in json.loads(out.read_text())["recv_ns"].items()}
    return summary, recv


def _cfg() -> Config:
    cfg = load_config()
    return cfg.replace("engine", status_s=0.0, device="cpu")


def run_replay(results: Results, settings: BenchSettings) -> None:
    from stream.registry import build_source

    sec = "d replay e2e"
    _CACHE.mkdir(parents=True, exist_ok=True)
    size = SensorSize(346, 260)
    cfg = _cfg().replace("replay", isolate=True, progress=False)
    files = []
    # 600 steps: the dense-path model runs ~50 steps/s at 346x260, so more would take minutes
    n_scene = 50 if settings.tiny else 600
    scene_path = _CACHE / f"scene_{size}_{n_scene}.aedat4"
    if not scene_path.is_file():
        ev, _ = inputs.scene_events(cfg, size, n_scene)
        write_aedat4(scene_path, ev, size)
    files.append(("scene", scene_path, True))
    n_dense = 100_000 if settings.tiny else 4_000_000
    dense_path = _CACHE / f"dense20M_{size}_{n_dense}.aedat4"
    if not dense_path.is_file():
        from .bench_binning import random_events

        write_aedat4(dense_path, random_events(n_dense, size, n_dense // 20, seed=3), size)
    files.append(("dense 20 Mev/s", dense_path, False))
    repeats = 1 if settings.tiny else min(settings.repeats, 3)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for label, path, with_model in files:
            variants = [("pass-through model", NullModel)] + ([("SpikeSEG model", None)] if with_model else [])
            if settings.tiny:  # keep `make test` short: one run per file
                variants = variants[-1:]
            for vname, factory in variants:
                mevs, xrt, walls, lost = [], [], [], 0
                for _ in range(repeats):
                    spy = SpySink()
                    src = build_source(str(path), cfg)
                    summary, recv = _run(cfg, src, spy, free_endpoint(), tmp, model_factory=factory)
                    if summary.exit_code != 0 and factory is None and "instances" in str(summary.error) and cfg["model"].instances:
                        # HULK-SMASH is written in parallel; report, then measure without it
                        results.notes.append(f"replay with instances on failed ({summary.error}); measured with instances: false")
                        cfg = cfg.replace("model", instances=False)
                        spy = SpySink()
                        src = build_source(str(path), cfg)
                        summary, recv = _run(cfg, src, spy, free_endpoint(), tmp, model_factory=factory)
                    if summary.exit_code != 0:
                        raise RuntimeError(f"replay of {path.name} failed: {summary.error}")
                    if not spy.rows:
                        raise RuntimeError(f"replay of {path.name} produced no masks")
                    t_first = min(r[1] for r in spy.rows)
                    t_last = max(r[2] for r in spy.rows)
                    dt = max((t_last - t_first) / 1e9, 1e-9)
                    n_ev = sum(r[3] for r in spy.rows)
                    sensor_s = len(spy.rows) * cfg["binner"].bin_us / 1e6
                    mevs.append(n_ev / dt / 1e6)
                    xrt.append(sensor_s / dt)
                    walls.append(summary.wall_s)
                    lost += len(spy.rows) - len(recv)
                target = TARGET_REPLAY_MEVS if factory is NullModel and label.startswith("dense") else None
                extra = {"file": path.name, "run_wall_s": walls, "masks_not_received": lost, "steps": len(spy.rows)}
                results.add(Row(sec, f"{label} -> zmq, {vname}", Stat.of(mevs), "Mev/s",
                                f">= {target:g}" if target else "", target, extra=extra))
                results.add(Row(sec, f"{label} -> zmq, {vname}", Stat.of(xrt), "x realtime", extra=extra))


def run_live(results: Results, settings: BenchSettings) -> None:
    """(e) Synthetic source paced to real time, 1 ms bins: bin close -> sent, -> received.

    Twice: the default ``engine.live_queue_ms`` (250 ms of bins: hiccups pass without a drop)
    and 5 ms (the freshest masks when the model is slower than the bins; same dropped share).
    """
    for queue_ms, label in ((None, ""), (5.0, " [q 5ms]")):
        _run_live_once(results, settings, queue_ms, label)


def _run_live_once(results: Results, settings: BenchSettings, queue_ms: float | None, label: str) -> None:
    from stream.registry import build_source

    sec = "e live latency 1ms"
    duration = 0.5 if settings.tiny else 5.0
    cfg = _cfg().replace("synthetic", realtime=True, duration_s=duration + 1.0)
    if queue_ms is not None:
        cfg = cfg.replace("engine", live_queue_ms=queue_ms)
    with tempfile.TemporaryDirectory() as td:
        spy = SpySink()
        src = build_source("synthetic", cfg)
        summary, recv = _run(cfg, src, spy, free_endpoint(), Path(td), duration_s=duration)
        if summary.exit_code != 0 and "instances" in str(summary.error) and cfg["model"].instances:
            results.notes.append(f"live run with instances on failed ({summary.error}); measured with instances: false")
            cfg = cfg.replace("model", instances=False)
            spy = SpySink()
            src = build_source("synthetic", cfg)
            summary, recv = _run(cfg, src, spy, free_endpoint(), Path(td), duration_s=duration)
    if summary.exit_code != 0:
        raise RuntimeError(f"live run failed: {summary.error}")
    closed = {r[0]: r[1] for r in spy.rows}
    to_sink = np.array([(r[2] - r[1]) / 1e6 for r in spy.rows])
    to_sub = np.array([(recv[k] - closed[k]) / 1e6 for k in recv if k in closed])
    send = summary.stats.get("latency", {}).get("latency.send", {})
    extra = {"steps": len(spy.rows), "received": len(to_sub), "drops": summary.drops}
    # a live model slower than the bins drops the oldest queued bins (engine.live_queue_ms):
    # the latency rows are then those of the bins it kept, so the share dropped goes beside them
    dropped = int(summary.drops.get("model_in", 0))
    share = 100.0 * dropped / max(1, dropped + len(spy.rows))
    results.add(Row(sec, f"bins dropped (model slower than real time){label}", Stat(share, share, share, 1), "%",
                    higher_better=False, extra={"dropped": dropped, "processed": len(spy.rows)}))
    if send.get("n"):
        results.add(Row(sec, f"bin close -> zmq send p50{label}", Stat(send["p50_ms"], send["p50_ms"], send["p50_ms"], 1), "ms", higher_better=False, extra=extra))
        results.add(Row(sec, f"bin close -> zmq send p99{label}", Stat(send["p99_ms"], send["p99_ms"], send["p99_ms"], 1), "ms", higher_better=False))
        results.add(Row(sec, f"bin close -> zmq send max{label}", Stat(send["max_ms"], send["max_ms"], send["max_ms"], 1), "ms", higher_better=False))
    for name, arr, tgt in (("bin close -> spy sink", to_sink, None), ("bin close -> subscriber (other process)", to_sub, TARGET_P99_MS)):
        if len(arr) == 0:
            results.skip(sec, name + label, "no samples")
            continue
        p50, p99 = np.percentile(arr, [50, 99])
        results.add(Row(sec, f"{name} p50{label}", Stat(p50, p50, p50, 1), "ms", higher_better=False, extra=extra))
        results.add(Row(sec, f"{name} p99{label}", Stat(p99, p99, p99, 1), "ms", f"<= {tgt:g}" if tgt else "", tgt, higher_better=False))
        results.add(Row(sec, f"{name} max{label}", Stat(arr.max(), arr.max(), arr.max(), 1), "ms", higher_better=False))
