"""The engine: builds source -> binner -> model -> sinks, runs each stage in a thread, shuts down.

Threads (one per stage) rather than processes: the model (torch, numba) and the
dv-processing readers release the GIL in their heavy parts, the data crossing stages
are numpy arrays and tensors that would otherwise need copying between processes, and
Ctrl-C handling stays in one place.  The binner runs inside the source thread (it is
cheap and keeps a live reader one queue away from its bins).

Queues (``stream/queues.py``):

* ``model_in`` (binner -> model): ``block`` for unpaced file replay and the unpaced
  synthetic scene, so nothing is lost; ``drop_oldest`` for live and paced sources, so
  the reader is never blocked.  When the model falls behind, the *oldest* queued steps
  are dropped -- the freshest input wins and latency stays bounded by the queue
  capacity (``live_queue_ms`` of bins, 250 ms by default) -- and every drop is counted (``model_in`` drops in the summary).  Merging
  dropped steps into their neighbours was the alternative; it distorts the neurons'
  leak (a merged bin looks like a burst) so we prefer an honest, counted gap.
* ``sink:<name>`` (model -> each sink, fan-out): the sink's own ``queue_policy``.

Shutdown: Ctrl-C/SIGTERM (or ``--duration``) sets ``stop``; the source ends, the
binner flushes, in-flight steps drain through the model and sinks for at most
``drain_s``, then everything is closed (videos finalised, sockets closed).  An
exception in any node stops the whole pipeline: the first error is kept and reported
with the node's name, and the run exits non-zero.  No thread is ever joined without a
timeout.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from .binner import Binner
from .config import Config, section
from .events import MaskResult, SensorSize, Step, StreamReset
from .metrics import Metrics
from .node import NodeError, RunContext, SinkNode, SourceNode, UsageError
from .queues import END, BoundedQueue, QueueClosed

log = logging.getLogger("spikestream")


@section("engine")
@dataclass(frozen=True)
class EngineConfig:
    """Engine settings.

    ``device``: auto (CUDA when present) | cpu | cuda.  ``model_queue``: capacity of the
    binner -> model queue in steps for file replay and unpaced input.  ``live_queue_ms``: its
    capacity for live/paced sources, in sensor time (see the comment on the field).  ``live_policy``: what
    that queue does when full.  ``max_batch``: most queued steps the model takes at once.
    ``drain_s``: how long shutdown waits for in-flight steps.  ``status_s``: status line
    period (0 = off).  ``runs_dir``: where run folders are created.  ``threads``: torch
    intra-op threads (see the comment on the field).
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    model_queue: int = 256
    # Live input: when the model is slower than the bins arrive, the same share of bins is
    # dropped whatever the queue's size (it is a throughput limit); the size only sets how
    # stale the processed bins are, and which hiccups (a slow step, a video flush, the other
    # tenants of a 2-core VM) pass without a drop.  It is set in sensor time (250 ms = 250
    # bins at 1 ms, 50 at 5 ms; at least 2).  Measured on the 5 ms-bin soak (zmq + overlay
    # video): 4 bins dropped 0.6 % of the bins, 50 ms still 0.2 %; 250 ms none.  For the
    # freshest masks on an overloaded model use ~5 ms (bench (e) shows both).
    live_queue_ms: float = 250.0
    live_policy: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    max_batch: int = 16
    drain_s: float = 1.0
    status_s: float = 1.0
    runs_dir: str = "runs"
    # torch intra-op threads. 1 by default: the source, model and sink threads already share
    # the cores, and torch's OpenMP workers spin-wait between ops. Measured on 2 cores with a
    # trivial model: 42 steps/s with torch's default (2 spinning workers), 1,816 with 1.
    # 0 = leave torch's default (worth it only for the dense path with nothing else running).
    threads: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.model_queue <= 100_000:
            raise ValueError(f"model_queue={self.model_queue} out of range; use 1 .. 100000 steps")
        if not 0 < self.live_queue_ms <= 60_000:
            raise ValueError(f"live_queue_ms={self.live_queue_ms} out of range; use (0, 60000] ms of bins")
        if not 1 <= self.max_batch <= 1024:
            raise ValueError(f"max_batch={self.max_batch} out of range; use 1 .. 1024")
        if not 0 < self.drain_s <= 60:
            raise ValueError(f"drain_s={self.drain_s} out of range; use (0, 60] seconds")
        if self.status_s < 0:
            raise ValueError(f"status_s={self.status_s} must be >= 0 (0 = off)")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be >= 0 (0 = torch default)")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without CUDA is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def new_run_dir(base: str | Path, label: str) -> Path:
    """A fresh folder ``base/YYYYmmdd-HHMMSS-label[-n]`` (never reuses an existing one)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)[:40] or "run"
    base = Path(base)
    for n in range(1000):
        p = base / (f"{stamp}-{safe}" + (f"-{n}" if n else ""))
        try:
            p.mkdir(parents=True, exist_ok=False)
            return p
        except FileExistsError:
            continue
    raise NodeError(f"cannot create a run folder under {base}; remove old runs or pass another --output")


@dataclass
class RunSummary:
    steps: int = 0
    masks: int = 0
    events_in: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    latency_p50_ms: float = float("nan")
    latency_p99_ms: float = float("nan")
    latency_max_ms: float = float("nan")
    wall_s: float = 0.0
    steps_per_s: float = 0.0
    error: str | None = None
    exit_code: int = 0  # 0 ok, 1 runtime failure, 2 bad input found while opening
    interrupted: bool = False
    live: bool = False
    run_dir: Path | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        drops = ", ".join(f"{k} {v}" for k, v in self.drops.items() if v) or "none"
        # Unpaced replays fill the blocking queue on purpose (nothing is dropped), so their
        # bin-close -> mask latency is mostly queueing: say so rather than alarm the user.
        queued = "" if self.live else " (unpaced input: includes queueing)"
        return (
            f"{self.steps} steps, {self.masks} masks, {self.events_in} events in {self.wall_s:.2f} s "
            f"({self.steps_per_s:.0f} steps/s); latency{queued} p50 {self.latency_p50_ms:.2f} ms, "
            f"p99 {self.latency_p99_ms:.2f} ms, max {self.latency_max_ms:.2f} ms; drops: {drops}"
        )


class _Failure:
    """First error wins; later errors (usually consequences) are logged at debug level."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.message: str | None = None
        self.code = 0

    def set(self, where: str, exc: BaseException) -> None:
        if isinstance(exc, (NodeError, UsageError)):
            msg = f"{where}: {exc}"
        else:
            msg = f"{where} failed: {type(exc).__name__}: {exc}"
        with self._lock:
            if self.message is None:
                self.message = msg
                self.code = 2 if isinstance(exc, UsageError) else 1  # bad input found at open
                log.debug("pipeline error", exc_info=exc)
            else:
                log.debug("later error in %s: %s", where, exc)


def _is_control(item: Any) -> bool:
    return item is END or isinstance(item, StreamReset)


class Pipeline:
    """One run of source -> binner -> model -> sinks.  Use :func:`run_pipeline`."""

    def __init__(
        self,
        cfg: Config,
        source: SourceNode,
        sinks: list[SinkNode],
        *,
        weights: str | None = None,
        duration_s: float | None = None,
        run_dir: Path | None = None,
        model_hook: Callable[[Any], None] | None = None,
        model_factory: Callable[..., Any] | None = None,
        status_stream: Any = None,
    ) -> None:
        if duration_s is not None and duration_s <= 0:
            raise UsageError(f"--duration {duration_s} must be > 0 seconds")
        self.cfg = cfg
        self.ecfg: EngineConfig = cfg["engine"]
        self.source = source
        self.sinks = list(sinks)
        self.weights = weights
        self.duration_us = None if duration_s is None else int(duration_s * 1e6)
        self.run_dir = run_dir
        self.model_hook = model_hook
        self.model_factory = model_factory
        self.status_stream = status_stream
        self.device = resolve_device(self.ecfg.device)
        self.metrics = Metrics()
        self.stop = threading.Event()  # graceful: stop reading, drain
        self.abort = threading.Event()  # hard: stop draining too
        self.failure = _Failure()
        self.interrupted = False
        self._reset_request: str | None = None
        self._paused = threading.Event()
        self.model = None
        self.binner: Binner | None = None
        self.prefilter = None

    # -- callbacks for nodes ---------------------------------------------------------
    def request_reset(self, reason: str) -> None:
        self._reset_request = reason

    def request_pause(self, paused: bool) -> None:
        (self._paused.set if paused else self._paused.clear)()

    def request_stop(self, reason: str = "") -> None:
        if reason:
            log.info("stopping: %s", reason)
        self.interrupted = True
        self.stop.set()

    # -- threads ------------------------------------------------------------------------
    def _source_loop(self, q_model: BoundedQueue) -> None:
        src, binner = self.source, self.binner
        assert binner is not None
        first_t: int | None = None  # start of the current stream (file, loop pass)
        last_t: int | None = None
        before_us = 0  # sensor time of the streams before it: --duration counts across loops and files
        try:
            for item in src.packets():
                if self.stop.is_set():
                    break
                while self._paused.is_set() and not self.stop.is_set():
                    self.stop.wait(0.05)
                if self._reset_request is not None:
                    reason, self._reset_request = self._reset_request, None
                    for out in binner.process(StreamReset(reason, source=src.describe())):
                        q_model.put(out, self.stop)
                if not isinstance(item, StreamReset):
                    if self.prefilter is not None:
                        item = self.prefilter.process(item)
                    n = len(item.events)
                    if n:
                        self.metrics.inc("events_in", n)
                elif self.prefilter is not None and item.size is not None:
                    self.prefilter.reset(item.size)
                    item = StreamReset(item.reason, self.prefilter.size_out, item.source)
                done = False
                for out in binner.process(item):
                    if isinstance(out, StreamReset) and first_t is not None and last_t is not None:
                        before_us += last_t - first_t  # a new stream restarts its timestamps
                        first_t = last_t = None
                    if isinstance(out, Step):
                        if first_t is None:
                            first_t = out.t0_us
                        last_t = out.t1_us
                        if self.duration_us is not None and before_us + out.t1_us - first_t > self.duration_us:
                            done = True
                            break
                        self.metrics.inc("steps")
                        self.metrics.gauge("sensor_time_s", (before_us + out.t1_us - first_t) / 1e6)
                    q_model.put(out, self.stop)
                if done:
                    break
            else:
                for out in binner.flush():
                    self.metrics.inc("steps")
                    q_model.put(out, self.stop)
        except QueueClosed:
            pass
        except BaseException as e:  # noqa: BLE001 - reported with the node's name, run stops
            # stop, not abort: the steps already binned still drain through the model and sinks
            # (a corrupt file keeps every mask produced before the bad packet).
            self.failure.set(f"source {src.describe()}", e)
            self.stop.set()
            try:
                for out in binner.flush():
                    self.metrics.inc("steps")
                    q_model.put(out, self.abort)
            except BaseException:  # noqa: BLE001 - best effort; the first error is already kept
                pass
        finally:
            try:
                q_model.put(END)
            except QueueClosed:
                pass

    def _model_loop(self, q_in: BoundedQueue, q_outs: list[BoundedQueue]) -> None:
        model = self.model
        max_batch = self.ecfg.max_batch
        deadline: float | None = None
        try:
            while not self.abort.is_set():
                if self.stop.is_set() and deadline is None:
                    deadline = time.monotonic() + self.ecfg.drain_s
                if deadline is not None and time.monotonic() > deadline:
                    break
                try:
                    batch = q_in.get_many(max_batch, timeout=0.05)
                except TimeoutError:
                    continue
                if batch[0] is END:
                    break
                if isinstance(batch[0], StreamReset):
                    outs = model.process(batch[0])
                elif hasattr(model, "iter_batch"):
                    # each result goes on as soon as it is ready: the first step of a queued
                    # batch does not wait for the batch's last one (live latency).  With steps
                    # queued behind the batch, a pipelined node may hold its last result for
                    # the next call (``more``); with none, it is flushed at once
                    outs = model.iter_batch(batch, more=q_in.data_next)
                else:
                    outs = model.process_batch(batch)
                self._forward(outs, q_outs)
                if hasattr(model, "flush") and not q_in.data_next():
                    self._forward(model.flush(), q_outs)
            if hasattr(model, "flush") and not self.abort.is_set():
                self._forward(model.flush(), q_outs)  # END or the drain deadline: nothing stays held
        except QueueClosed:
            pass
        except BaseException as e:  # noqa: BLE001
            self.failure.set("model", e)
            self.stop.set()
            self.abort.set()
        finally:
            q_in.close()  # wakes a source blocked on a full queue
            for q in q_outs:
                try:
                    q.put(END)
                except QueueClosed:
                    pass

    def _forward(self, outs: Any, q_outs: list[BoundedQueue]) -> None:
        """Hand the model's results to every sink queue as they come."""
        for out in outs:
            if isinstance(out, MaskResult):
                self.metrics.inc("masks")
                self.metrics.latency("latency.e2e", (out.model_done_ns - out.step.closed_ns) / 1e9)
            for q in q_outs:
                q.put(out, self.abort)

    def _sink_loop(self, sink: SinkNode, q: BoundedQueue) -> None:
        deadline: float | None = None
        try:
            while not self.abort.is_set():
                if self.stop.is_set() and deadline is None:
                    deadline = time.monotonic() + self.ecfg.drain_s
                if deadline is not None and time.monotonic() > deadline:
                    break
                try:
                    item = q.get(timeout=0.05)
                except TimeoutError:
                    continue
                if item is END:
                    break
                sink.process(item)
        except BaseException as e:  # noqa: BLE001
            self.failure.set(f"sink {sink.name}", e)
            self.stop.set()
            self.abort.set()
        finally:
            q.close()

    # -- run ------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        from sources.prefilter import build_prefilter  # sources own filtering and ROI

        t_wall0 = time.monotonic()
        if self.ecfg.threads:
            torch.set_num_threads(self.ecfg.threads)
        if self.run_dir is None:
            self.run_dir = new_run_dir(self.ecfg.runs_dir, self.source.name)
        self.run_dir = Path(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(self.cfg.dump(), encoding="utf-8")
        ctx = RunContext(
            stop=self.stop,
            metrics=self.metrics,
            run_dir=self.run_dir,
            request_reset=self.request_reset,
            request_pause=self.request_pause,
            info={"device": str(self.device)},
        )
        opened: list[Any] = []
        threads: list[threading.Thread] = []
        try:
            self.source.open(ctx)
            opened.append(self.source)
            size: SensorSize = self.source.size
            self.prefilter = build_prefilter(self.cfg, size)
            self.prefilter.open(ctx)
            opened.append(self.prefilter)
            size = self.prefilter.size_out
            ctx.info["size"] = size
            ctx.info["source"] = self.source.describe()
            self.binner = Binner(self.cfg["binner"], size, self.device, self.source.describe(), self.metrics)
            factory = self.model_factory
            if factory is None:
                from model.node import build_model_node

                factory = build_model_node
            self.model = factory(self.cfg, size, self.cfg["binner"].channels, self.device, self.weights)
            self.model.open(ctx)
            opened.append(self.model)
            if self.model_hook is not None:
                self.model_hook(self.model)
            for s in self.sinks:
                s.open(ctx)
                opened.append(s)
            for s in self.sinks:
                s.wait_ready(self.stop)

            live = bool(getattr(self.source, "live", False))
            bin_us = int(self.cfg["binner"].bin_us)
            live_cap = max(2, math.ceil(self.ecfg.live_queue_ms * 1000 / bin_us))
            q_model = BoundedQueue(
                "model_in",
                live_cap if live else self.ecfg.model_queue,
                self.ecfg.live_policy if live else "block",
                _is_control,
            )
            self.metrics.register_queue(q_model)
            q_sinks = []
            for s in self.sinks:
                q = BoundedQueue(f"sink:{s.name}", s.queue_capacity, s.queue_policy, _is_control)
                self.metrics.register_queue(q)
                q_sinks.append(q)
            threads.append(threading.Thread(target=self._source_loop, args=(q_model,), name="source", daemon=True))
            threads.append(threading.Thread(target=self._model_loop, args=(q_model, q_sinks), name="model", daemon=True))
            for s, q in zip(self.sinks, q_sinks):
                threads.append(threading.Thread(target=self._sink_loop, args=(s, q), name=f"sink:{s.name}", daemon=True))
            if self.stop.is_set():  # interrupted while opening / waiting for subscribers
                q_model.put(END)
            for t in threads:
                t.start()
            self._supervise(threads)
        except BaseException as e:  # noqa: BLE001 - open failures, Ctrl-C during open
            if isinstance(e, KeyboardInterrupt):
                self.interrupted = True
            else:
                self.failure.set(getattr(e, "_node_name", "start-up"), e)
            self.stop.set()
            self.abort.set()
        finally:
            self.stop.set()
            for t in threads:
                t.join(timeout=self.ecfg.drain_s + 1.0)
            self.abort.set()
            for node in reversed(opened):
                try:
                    node.close()
                except BaseException as e:  # noqa: BLE001
                    self.failure.set(f"closing {getattr(node, 'name', node)}", e)
            for t in threads:
                t.join(timeout=0.5)
        return self._summary(time.monotonic() - t_wall0)

    def _supervise(self, threads: list[threading.Thread]) -> None:
        """Wait for the threads; print the status line; react to stop requests."""
        period = self.ecfg.status_s
        stream = self.status_stream
        tty = bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())
        next_status = time.monotonic() + (period or 1e9)
        while True:
            alive = [t for t in threads if t.is_alive()]
            if not alive:
                break
            alive[0].join(timeout=0.05)  # a dead thread's join returns at once: never spin on one
            now = time.monotonic()
            if now >= next_status:
                self.metrics.tick()
                if stream is not None and period:
                    line = self.metrics.status_line()
                    stream.write(("\r" + line[:200] + "\x1b[K") if tty else line + "\n")
                    stream.flush()
                next_status = now + period
            if self.stop.is_set():
                # Graceful stop: give the drain its time, then abort whatever still runs.
                end = time.monotonic() + self.ecfg.drain_s + 0.5
                while time.monotonic() < end:
                    alive = [t for t in threads if t.is_alive()]
                    if not alive:
                        break
                    alive[0].join(timeout=0.05)
                self.abort.set()
                break
        if tty and period:
            stream.write("\n")

    def _summary(self, wall: float) -> RunSummary:
        snap = self.metrics.snapshot()
        lat = snap["latency"].get("latency.e2e", {})
        c = snap["counters"]
        drops = {k[len("drops."):]: int(v) for k, v in c.items() if k.startswith("drops.")}
        for name, qs in snap["queues"].items():
            drops[name] = int(qs["dropped"])
        s = RunSummary(
            steps=int(c.get("steps", 0)),
            masks=int(c.get("masks", 0)),
            events_in=int(c.get("events_in", 0)),
            drops=drops,
            latency_p50_ms=lat.get("p50_ms", float("nan")),
            latency_p99_ms=lat.get("p99_ms", float("nan")),
            latency_max_ms=lat.get("max_ms", float("nan")),
            wall_s=wall,
            steps_per_s=c.get("masks", 0) / wall if wall > 0 else 0.0,
            error=self.failure.message,
            exit_code=self.failure.code,
            interrupted=self.interrupted,
            live=bool(getattr(self.source, "live", False)),
            run_dir=self.run_dir,
            stats=snap,
        )
        return s


def run_pipeline(
    cfg: Config,
    source: SourceNode,
    sinks: list[SinkNode],
    *,
    weights: str | None = None,
    duration_s: float | None = None,
    run_dir: Path | None = None,
    model_hook: Callable[[Any], None] | None = None,
    model_factory: Callable[..., Any] | None = None,
    status_stream: Any = None,
    stats_json: str | Path | None = None,
    install_signals: bool = False,
) -> RunSummary:
    """Run the graph to the end (or until stopped) and return its :class:`RunSummary`.

    ``install_signals`` (the CLI sets it) turns SIGINT/SIGTERM into a graceful stop; a
    second signal aborts the drain.  ``model_factory(cfg, size, in_channels, device,
    weights)`` replaces the SpikeSEG node (tests use it to run the engine alone).
    """
    pipe = Pipeline(
        cfg, source, sinks, weights=weights, duration_s=duration_s, run_dir=run_dir,
        model_hook=model_hook, model_factory=model_factory, status_stream=status_stream,
    )
    old: dict[int, Any] = {}
    if install_signals and threading.current_thread() is threading.main_thread():
        def _on_signal(signum: int, _frame: Any) -> None:
            if pipe.stop.is_set():
                pipe.abort.set()
            pipe.request_stop(f"received {signal.Signals(signum).name}")

        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, _on_signal)
    try:
        summary = pipe.run()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if stats_json is not None or summary.run_dir is not None:
        stats = {
            "summary": {k: v for k, v in summary.__dict__.items() if k not in ("stats", "run_dir")},
            "metrics": summary.stats,
        }
        text = json.dumps(stats, indent=2, default=str)
        if summary.run_dir is not None:
            (Path(summary.run_dir) / "stats.json").write_text(text, encoding="utf-8")
        if stats_json is not None:
            Path(stats_json).write_text(text, encoding="utf-8")
    return summary
