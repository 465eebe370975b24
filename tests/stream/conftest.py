"""In-memory list sources, list sinks and a stand-in model for engine tests."""
from __future__ import annotations

import threading
from typing import Iterator

import numpy as np
import pytest

from stream.events import EventPacket, MaskResult, SensorSize, Step, StreamReset, make_events
from stream.node import SinkNode, SourceNode, Transform


class ListSource(SourceNode):
    name = "list"

    def __init__(self, items: list, size: SensorSize, live: bool = False, fail_at: int | None = None) -> None:
        self.items, self._size, self.live, self.fail_at = items, size, live, fail_at
        self.opened = self.closed = 0

    @property
    def size(self) -> SensorSize:
        return self._size

    def open(self, ctx) -> None:
        self.opened += 1
        self.ctx = ctx

    def packets(self) -> Iterator:
        for i, it in enumerate(self.items):
            if self.fail_at is not None and i == self.fail_at:
                raise RuntimeError("source broke")
            if self.ctx.stop.is_set():
                return
            yield it

    def close(self) -> None:
        self.closed += 1


class ListSink(SinkNode):
    def __init__(self, name: str = "list", policy: str = "block", capacity: int = 64, fail_at: int | None = None, delay_s: float = 0.0) -> None:
        self.name, self.queue_policy, self.queue_capacity = name, policy, capacity
        self.fail_at, self.delay_s = fail_at, delay_s
        self.items: list = []
        self.opened = self.closed = 0
        self._wait = threading.Event()

    def open(self, ctx) -> None:
        self.opened += 1

    def process(self, item) -> None:
        if self.fail_at is not None and len(self.items) == self.fail_at:
            raise ValueError("sink broke")
        if self.delay_s:
            self._wait.wait(self.delay_s)
        self.items.append(item)

    def close(self) -> None:
        self.closed += 1


class EchoModel(Transform):
    """Stand-in for SpikeSEG: mask = pixels with events; records its batches."""

    name = "model"

    def __init__(self, delay_s: float = 0.0, fail_at: int | None = None) -> None:
        self.batches: list[int] = []
        self.resets = 0
        self.opened = self.closed = 0
        self.delay_s, self.fail_at = delay_s, fail_at
        self._wait = threading.Event()
        self.seen = 0

    def open(self, ctx) -> None:
        self.opened += 1

    def close(self) -> None:
        self.closed += 1

    def process(self, item):
        self.resets += 1
        return [item]

    def process_batch(self, steps: list[Step]) -> list[MaskResult]:
        import time

        self.batches.append(len(steps))
        out = []
        for s in steps:
            if self.fail_at is not None and self.seen == self.fail_at:
                raise RuntimeError("model broke")
            self.seen += 1
            if self.delay_s:
                self._wait.wait(self.delay_s)
            mask = (s.frame.sum(0) > 0).numpy().astype(np.uint8)
            out.append(MaskResult(step=s, mask=mask, model_done_ns=time.perf_counter_ns()))
        return out


class HoldingModel(EchoModel):
    """A pipelined stand-in: holds a batch's last result while ``more()`` says steps are queued
    (as the overlap pipeline does) and yields it first in the next call or from ``flush``."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.held: MaskResult | None = None
        self.holds = 0

    def iter_batch(self, steps: list[Step], more=None) -> Iterator[MaskResult]:
        out = self.process_batch(steps)
        if self.held is not None:
            out.insert(0, self.held)
            self.held = None
        if more is not None and more():
            self.held = out.pop()
            self.holds += 1
        yield from out

    def flush(self) -> Iterator[MaskResult]:
        held, self.held = self.held, None
        if held is not None:
            yield held

    def process(self, item):
        return [*self.flush(), *super().process(item)]


@pytest.fixture
def echo_factory():
    holder: dict = {}

    def factory(cfg, size, in_channels, device, weights, **kw):
        holder["model"] = holder.get("cls", EchoModel)(**holder.get("kw", {}))
        return holder["model"]

    factory.holder = holder
    return factory


def packets(n_packets: int, size: SensorSize, per_packet: int = 50, span_us: int = 1000, seed: int = 0) -> list[EventPacket]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_packets):
        t = np.sort(rng.integers(k * span_us, (k + 1) * span_us, per_packet))
        ev = make_events(t, rng.integers(0, size.width, per_packet), rng.integers(0, size.height, per_packet), rng.integers(0, 2, per_packet))
        out.append(EventPacket(ev, size, t_end_us=(k + 1) * span_us))
    return out
