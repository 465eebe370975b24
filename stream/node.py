"""Node lifecycle shared by sources, the binner, the model and sinks.

Every node follows ``open() -> process(item)* -> close()`` (Holoscan-style):

* the constructor validates config and touches nothing outside the process;
* ``open(ctx)`` acquires files, sockets, devices; it may raise :class:`NodeError`
  with a user-facing one-line message;
* ``process(item)`` does the work for one item and returns the items to pass on;
* ``close()`` always runs once ``open`` was attempted, also after an error or Ctrl-C,
  and must be idempotent.

Sources are nodes whose ``packets()`` generator produces the stream instead of
consuming one.  The engine (``stream/engine.py``) runs every node in its own thread.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from .events import EventPacket, MaskResult, SensorSize, StreamReset


class NodeError(RuntimeError):
    """A failure with a message fit for the user: what was wrong, what is allowed, what to do.

    The CLI prints ``str(err)`` on one line and exits 1 (no traceback).
    """


class UsageError(ValueError):
    """Bad command-line or config input; the CLI prints it on one line and exits 2."""


@dataclass
class RunContext:
    """What the engine hands every node at ``open``.

    ``stop`` is set when the run must end (Ctrl-C, error, duration reached); long
    waits inside nodes should poll it.  ``request_reset`` asks the engine to insert a
    :class:`StreamReset` at the source (the overlay's ``r`` key).  ``metrics`` is the
    run's :class:`stream.metrics.Metrics`.  ``run_dir`` is where outputs go.
    """

    stop: threading.Event
    metrics: Any
    run_dir: Any = None
    request_reset: Callable[[str], None] = lambda reason: None
    request_pause: Callable[[bool], None] = lambda paused: None
    info: dict[str, Any] = field(default_factory=dict)


class Node(ABC):
    """Base class: a named stage with a lifecycle."""

    name: str = "node"

    def open(self, ctx: RunContext) -> None:  # noqa: B027 - optional hook
        """Acquire resources. Default: nothing."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources. Must be idempotent and never raise for an unopened node."""


class SourceNode(Node):
    """Produces :class:`EventPacket` and :class:`StreamReset` items.

    ``size`` must be known after ``open`` (from the device, file or stream).
    ``live`` is True for sources that must never be blocked (camera, network, paced
    replay): the engine then uses dropping queues downstream.
    """

    live: bool = False

    @property
    @abstractmethod
    def size(self) -> SensorSize: ...

    @abstractmethod
    def packets(self) -> Iterator[EventPacket | StreamReset]:
        """Yield packets until the stream ends or ``ctx.stop`` is set."""

    def describe(self) -> str:
        """A short description for the ``source`` field of published masks."""
        return self.name


class SinkNode(Node):
    """Consumes :class:`MaskResult` (and :class:`StreamReset`) items.

    ``queue_policy`` is the policy of the sink's input queue: ``block`` for sinks
    that must see every step (publisher, recorder), ``drop_oldest`` for displays.
    """

    queue_policy: str = "block"
    queue_capacity: int = 64

    @abstractmethod
    def process(self, item: MaskResult | StreamReset) -> None: ...

    def wait_ready(self, stop: threading.Event) -> None:
        """Block until the sink is ready for data (e.g. ZeroMQ subscribers joined)."""


class Transform(Node):
    """A node in the middle: consumes items, returns the items to pass on."""

    @abstractmethod
    def process(self, item: Any) -> Iterable[Any]: ...
