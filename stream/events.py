"""The one event type of SpikeSEG-Stream, and the packets that carry it.

Events are a numpy structured array with exactly dv-processing's layout
(``EventStore.numpy()`` returns it without a copy): ``timestamp`` int64 in
microseconds of sensor time, ``x``/``y`` int16, ``polarity`` int8 (1 = ON, 0 = OFF),
16 bytes per event with padding.

A packet may be empty; it is never ``None``.  Control items (:class:`StreamReset`)
travel through the same queues so that every node sees resets in order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: dv-processing's event layout (offsets and itemsize included, so that arrays from
#: ``dv.EventStore.numpy()`` are used as they are).
EVENT_DTYPE = np.dtype(
    {
        "names": ["timestamp", "x", "y", "polarity"],
        "formats": ["<i8", "<i2", "<i2", "i1"],
        "offsets": [0, 8, 10, 12],
        "itemsize": 16,
    }
)


@dataclass(frozen=True)
class SensorSize:
    """Sensor geometry in pixels."""

    width: int
    height: int

    def __post_init__(self) -> None:
        if not (isinstance(self.width, int) and isinstance(self.height, int)) or self.width <= 0 or self.height <= 0:
            raise ValueError(
                f"sensor size {self.width}x{self.height} is invalid: width and height must be positive integers"
            )

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def empty_events(n: int = 0) -> np.ndarray:
    """A zeroed event array of length ``n`` in :data:`EVENT_DTYPE`."""
    return np.zeros(n, dtype=EVENT_DTYPE)


def make_events(t_us, x, y, p) -> np.ndarray:
    """Build an event array from four equally long sequences (a convenience for tests and tools)."""
    t = np.asarray(t_us, dtype=np.int64)
    out = empty_events(len(t))
    out["timestamp"] = t
    out["x"] = np.asarray(x, dtype=np.int16)
    out["y"] = np.asarray(y, dtype=np.int16)
    out["polarity"] = np.asarray(p, dtype=np.int8)
    return out


#: The same 16 bytes seen as one opaque item.  numpy copies structured arrays with padding
#: field by field (``np.concatenate`` of three 8,000-event packets: 270 µs, ``arr[mask]``
#: likewise); seen as ``V16`` the same copy is a memcpy (11 µs).  Measured, see
#: benchmarks/README.md ("e2e").
_EVENT_BYTES = np.dtype((np.void, EVENT_DTYPE.itemsize))


def concat_events(parts: list[np.ndarray]) -> np.ndarray:
    """``np.concatenate(parts)`` for :data:`EVENT_DTYPE` arrays, copied as raw 16-byte items."""
    for p in parts:
        if p.dtype != EVENT_DTYPE:
            raise ValueError(f"concat_events needs EVENT_DTYPE arrays, got {p.dtype}; convert with as_events()")
    return np.concatenate([p.view(_EVENT_BYTES) for p in parts]).view(EVENT_DTYPE)


def take_events(events: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``events[keep]`` (boolean mask) for an :data:`EVENT_DTYPE` array, copied as raw items."""
    return events.view(_EVENT_BYTES)[keep].view(EVENT_DTYPE)


def as_events(arr: np.ndarray) -> np.ndarray:
    """Return ``arr`` as :data:`EVENT_DTYPE`, converting field by field if it has another layout.

    Raises ValueError naming the missing fields when it is not an event array.
    """
    if arr.dtype == EVENT_DTYPE:
        return arr
    names = arr.dtype.names or ()
    missing = [n for n in ("timestamp", "x", "y", "polarity") if n not in names]
    if missing:
        raise ValueError(
            f"not an event array: fields {missing} missing (have {list(names)}); "
            "expected timestamp/x/y/polarity"
        )
    return make_events(arr["timestamp"], arr["x"], arr["y"], arr["polarity"])


@dataclass
class EventPacket:
    """A run of events from one sensor, in time order as far as the source knows.

    ``t_end_us`` is the sensor time up to which the source promises completeness: every
    event with ``timestamp < t_end_us`` has been delivered by the end of this packet.
    Live sources send *empty* packets with a growing ``t_end_us`` when the sensor is
    quiet, so that the binner can close bins on the wall clock.  ``None`` means "as far
    as the last event" (file replay).

    ``labels`` (optional, int16 per event) is ground truth: 0 = background, k > 0 = the
    id of the object that produced the event.  Only synthetic scenes and labelled
    recordings have it.
    """

    events: np.ndarray
    size: SensorSize
    t_end_us: int | None = None
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.events is None:  # loud: a packet is never None, nor holds None
            raise ValueError("EventPacket.events is None; use empty_events() for an empty packet")
        if self.labels is not None and len(self.labels) != len(self.events):
            raise ValueError(f"labels has {len(self.labels)} entries for {len(self.events)} events")

    def __len__(self) -> int:
        return len(self.events)


@dataclass(frozen=True)
class StreamReset:
    """Control item: the stream restarts (new file, loop wrap, user pressed ``r``).

    The binner re-aligns bins to the next event; the model drops its state; sinks may
    mark the cut.  ``reason`` is shown to users.
    """

    reason: str
    size: SensorSize | None = None
    source: str = ""


@dataclass(frozen=True)
class Instance:
    """One object in one step's mask (HULK-SMASH output).

    ``bbox`` is ``(x0, y0, x1, y1)`` inclusive, in sensor pixels.
    """

    id: int
    cls: int
    bbox: tuple[int, int, int, int]
    area: int


@dataclass
class Step:
    """One time bin, binned and ready for the model.

    ``frame`` is a (C, H, W) float tensor of event counts on the model's device
    (C = 2: OFF, ON; or C = 1 merged).  ``events`` are the bin's events (numpy, host),
    kept for sinks that draw or record them and for evaluation; ``labels`` likewise.
    ``closed_ns`` is ``time.perf_counter_ns()`` when the bin closed (latency origin).
    """

    index: int
    t0_us: int
    t1_us: int
    frame: "object"  # torch.Tensor; typed loosely so stream/ imports without torch
    events: np.ndarray
    size: SensorSize
    closed_ns: int
    labels: np.ndarray | None = None
    source: str = ""

    @property
    def n_events(self) -> int:
        return len(self.events)


@dataclass
class MaskResult:
    """The model's output for one step: what every sink consumes.

    ``mask`` is (H, W) uint8, 0 = background, k = class k (1-based).
    ``layer_spikes`` holds per-layer spike counts for this step (ints, host).
    ``extra`` carries optional figures (adaptation state, saliency stats) for HUDs.
    """

    step: Step
    mask: np.ndarray
    instances: list[Instance] = field(default_factory=list)
    layer_spikes: dict[str, int] = field(default_factory=dict)
    model_done_ns: int = 0
    extra: dict[str, float] = field(default_factory=dict)
