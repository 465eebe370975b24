"""``--sink record:PATH.aedat4``: record the input events and the masks with dv-processing.

The file has two streams written by ``dv.io.MonoCameraWriter`` (camera name
``SpikeStream``), so DV's own tools play a run back:

* ``events``: every event of every step, unchanged;
* ``frames``: one 8-bit grey frame per step, timestamped at the bin start ``t0_us``,
  pixel value = class id × ``mask_scale`` (0 = background).  The scale is stored in the
  stream metadata as ``maskScale``; ``mask = frame // maskScale`` decodes it.

``mask_scale: 0`` (default) picks ``255 // model.n_classes`` so that the highest class is
white (1 class: 255; 3 classes: 85).

Timestamps in aedat4 must not go backwards within a stream.  After a
:class:`StreamReset` that rewinds sensor time (a looped replay), later steps are
shifted to continue from the end of the previous segment; a single pass is recorded
with its timestamps unchanged.

Decisions: events are converted with ``EventStore.push_back`` over ``ndarray.tolist()``
tuples, the fastest correct route found in dv-processing 2.0.4 (≈1.2 M events/s; it has
no numpy -> EventStore constructor; building ``dv.Event`` objects into an
``EventPacket`` was ≈0.6 M/s).  The writer flushes and writes the file index when it is
destroyed, so ``close`` drops the only reference, also after errors.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dv_processing as dv
import numpy as np

from stream.config import section
from stream.events import MaskResult, SensorSize, StreamReset
from stream.node import NodeError, RunContext, SinkNode, UsageError
from stream.registry import register_sink

CAMERA_NAME = "SpikeStream"


@section("record")
@dataclass(frozen=True)
class RecordConfig:
    """``overwrite``: replace an existing file.  ``mask_scale``: grey value per class id
    (1..255; 0 = auto ``255 // model.n_classes``).  ``path``: output when ``record`` has
    no ``:PATH`` (None = ``RUN_DIR/record.aedat4``)."""

    overwrite: bool = False
    mask_scale: int = 0
    path: str | None = None

    def __post_init__(self) -> None:
        if not (0 <= self.mask_scale <= 255):
            raise ValueError(f"mask_scale={self.mask_scale} is not allowed; use 1..255, or 0 for 255 // n_classes")
        if self.path is not None and not self.path.endswith(".aedat4"):
            raise ValueError(f"path {self.path!r} is not allowed; it must end with .aedat4")


def events_to_store(events: np.ndarray, offset_us: int = 0) -> "dv.EventStore":
    """Copy an ``EVENT_DTYPE`` array into a new ``dv.EventStore``, adding ``offset_us`` to timestamps."""
    store = dv.EventStore()
    if len(events) == 0:
        return store
    if offset_us:
        events = events.copy()
        events["timestamp"] += offset_us
    push = store.push_back
    for tup in events.tolist():  # (t, x, y, p) tuples; dv casts p (0/1) to bool
        push(tup)
    return store


def _dv_error(e: BaseException) -> str:
    """The informative line of a dv-processing exception (they carry a file line and a stack trace)."""
    for line in str(e).splitlines():
        line = line.strip()
        if line and not line.startswith(("/", "Stacktrace")) and not line[0].isdigit():
            return line
    return type(e).__name__


class Recorder(SinkNode):
    """Writes events and mask frames of every step to an aedat4 file."""

    name = "record"
    queue_policy = "block"  # a recording must hold every step
    queue_capacity = 64

    def __init__(self, cfg: RecordConfig, path: str | Path | None = None, n_classes: int = 1) -> None:
        self.cfg = cfg
        p = path if path is not None else cfg.path
        self._given = Path(p) if p is not None else None
        if self._given is not None and self._given.suffix != ".aedat4":
            raise UsageError(f"record path {str(self._given)!r} must end with .aedat4, e.g. --sink record:run.aedat4")
        self.scale = cfg.mask_scale or max(1, 255 // max(1, n_classes))
        self.path: Path | None = None
        self.size: SensorSize | None = None
        self.steps = 0
        self.events = 0
        self._writer: Any = None
        self._offset = 0  # added to sensor time so that the file never goes backwards
        self._end = None  # last written t1 (file time)

    def open(self, ctx: RunContext) -> None:
        if self._given is not None:
            path = self._given
        elif ctx.run_dir is not None:
            path = Path(ctx.run_dir) / "record.aedat4"
        else:
            raise NodeError("record: no output path and no run folder; use --sink record:PATH.aedat4")
        if path.exists() and not self.cfg.overwrite:
            raise NodeError(f"{path} exists; pass --overwrite (record.overwrite: true) to replace it, or pick another path")
        if not path.parent.is_dir():
            raise NodeError(f"cannot write {path}: folder {path.parent} does not exist; create it or pick another path")
        self.path = path

    def _open_writer(self, size: SensorSize) -> None:
        if self.path is None:
            raise NodeError("record sink used before open(); this is a bug in the caller")
        if self.path.exists():  # overwrite was allowed in open()
            self.path.unlink()
        wcfg = dv.io.MonoCameraWriter.Config(CAMERA_NAME)
        wcfg.addEventStream((size.width, size.height))
        wcfg.addFrameStream((size.width, size.height))
        wcfg.addStreamMetadata("frames", ("maskScale", str(self.scale)))
        try:
            self._writer = dv.io.MonoCameraWriter(str(self.path), wcfg)
        except RuntimeError as e:
            raise NodeError(f"cannot create {self.path}: {_dv_error(e)}; check the folder is writable") from None
        self.size = size
        print(f"record: writing {self.path}", file=sys.stderr)

    def process(self, item: MaskResult | StreamReset) -> None:
        if not isinstance(item, MaskResult):
            return  # a reset only matters through the timestamps (see module doc)
        if self.path is None:
            raise NodeError("record sink used before open(); this is a bug in the caller")
        step = item.step
        if self._writer is None:
            self._open_writer(step.size)
        elif step.size != self.size:
            raise NodeError(f"record: sensor size changed from {self.size} to {step.size}; record each source separately")
        mask = item.mask
        top = int(mask.max()) if mask.size else 0
        if top * self.scale > 255:
            raise NodeError(
                f"record: class {top} x mask_scale {self.scale} exceeds 255; set record.mask_scale <= {255 // top}"
            )
        if self._end is not None and step.t0_us + self._offset < self._end:
            self._offset = self._end - step.t0_us  # sensor time rewound (reset/loop): continue after the last step
        t0 = step.t0_us + self._offset
        frame = (mask * np.uint8(self.scale)) if self.scale != 1 else mask.copy()
        try:
            if len(step.events):
                self._writer.writeEvents(events_to_store(step.events, self._offset))
            self._writer.writeFrame(dv.Frame(int(t0), np.ascontiguousarray(frame, dtype=np.uint8)))
        except RuntimeError as e:
            raise NodeError(f"record: cannot write step {step.index} to {self.path}: {_dv_error(e)}") from None
        self._end = step.t1_us + self._offset
        self.steps += 1
        self.events += len(step.events)

    def close(self) -> None:
        # Dropping the last reference runs the C++ destructor, which flushes the write
        # thread and writes the file index: the file is playable afterwards.
        self._writer = None


@register_sink("record", "record input events and masks to .aedat4 via dv-processing", "record:run.aedat4")
def make_recorder(arg: str | None, cfg: Any) -> Recorder:
    """Factory: ``record`` writes ``RUN_DIR/record.aedat4`` (or ``record.path``); ``record:PATH`` writes PATH."""
    rcfg: RecordConfig = cfg["record"] if cfg is not None and "record" in cfg else RecordConfig()
    model = cfg.get("model") if cfg is not None else None
    n_classes = int(getattr(model, "n_classes", 1) or 1)
    return Recorder(rcfg, arg or None, n_classes=n_classes)

