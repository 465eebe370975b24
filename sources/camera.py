"""Live iniVation cameras (DAVIS, DVXplorer) through dv-processing 2.x.

``dv.io.camera.discover()`` runs first: in 2.x ``open()`` with no device raises an opaque
``IndexError`` and ``CameraCapture`` no longer exists.  No device -> one-line
``NodeError`` naming what was found and pointing at ``--source FILE.aedat4`` /
``--source synthetic``; an unknown serial -> the serials found.

Time is the sensor's own (µs); it is kept as is.  ``getNextEventBatch()`` returns None
when nothing is new: the node then waits ``camera.poll_ms`` on ``ctx.stop`` (no core is
spun) and sends an *empty* packet with ``t_end_us`` advanced by the wall time since the
last event, mapped onto sensor time, so the binner closes bins while the scene is still.
A device that disappears (``isRunning()`` false or a read raising) ends the run cleanly
with a log message.

The camera is opened in-process (not in the reader child used for files/network): a
device handle cannot cross processes, and no corrupt-data hang is known for USB input.
``camera_api`` is injectable (``discover``/``open``) so the polling logic is tested
without hardware.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from stream.config import Config, section
from stream.events import EVENT_DTYPE, EventPacket, SensorSize, StreamReset
from stream.node import NodeError, RunContext, SourceNode
from stream.registry import register_source

log = logging.getLogger(__name__)


@section("camera")
@dataclass(frozen=True)
class CameraConfig:
    """``poll_ms``: wait between polls when the sensor is quiet (also the empty-packet rate)."""

    poll_ms: float = 2.0

    def __post_init__(self) -> None:
        if not 0.5 <= self.poll_ms <= 100:
            raise ValueError(f"poll_ms {self.poll_ms} out of range; allowed 0.5..100")


def _describe_device(d: Any) -> str:
    model = getattr(d, "cameraModel", "?")
    return f"{getattr(model, 'name', model)} {getattr(d, 'serialNumber', '?')}"


class CameraSource(SourceNode):
    """A live camera; ``serial`` None opens the first one discovered."""

    name = "camera"
    live = True

    def __init__(self, serial: str | None, cfg: CameraConfig, camera_api: Any = None) -> None:
        self.serial = serial or None
        self.cfg = cfg
        self._api = camera_api
        self._cam: Any = None
        self._size: SensorSize | None = None
        self._ctx: RunContext | None = None
        self._label = "camera"
        self.end_message = ""

    @property
    def size(self) -> SensorSize:
        if self._size is None:
            raise NodeError("camera source: size is known only after open(); call open(ctx) first")
        return self._size

    def describe(self) -> str:
        return self._label

    def open(self, ctx: RunContext) -> None:
        self._ctx = ctx
        api = self._api
        if api is None:
            import dv_processing as dv

            api = dv.io.camera
        devices = list(api.discover())
        if not devices:
            raise NodeError(
                "no event camera found (dv.io.camera.discover() listed no device); plug one in, "
                "or use --source FILE.aedat4 or --source synthetic"
            )
        found = ", ".join(_describe_device(d) for d in devices)
        if self.serial is None:
            dev = devices[0]
        else:
            match = [d for d in devices if str(getattr(d, "serialNumber", "")) == self.serial]
            if not match:
                serials = ", ".join(str(getattr(d, "serialNumber", "?")) for d in devices)
                raise NodeError(f"camera {self.serial} not found; serials found: {serials}; use --source camera:SERIAL")
            dev = match[0]
        try:
            self._cam = api.open(dev)
        except (RuntimeError, IndexError) as e:
            raise NodeError(f"cannot open camera {_describe_device(dev)} ({e}); found: {found}; is it in use by DV?") from None
        res = self._cam.getEventResolution()
        if res is None:
            raise NodeError(f"camera {_describe_device(dev)} has no event output; use a DVS/DAVIS/DVXplorer camera")
        self._size = SensorSize(int(res[0]), int(res[1]))
        self._label = f"camera:{getattr(dev, 'serialNumber', '?')}"

    def close(self) -> None:
        self._cam = None  # dv closes the device in the destructor

    def packets(self) -> Iterator[EventPacket | StreamReset]:
        if self._cam is None or self._ctx is None:
            raise NodeError("camera source: packets() before open(); the engine must open the source first")
        stop = self._ctx.stop
        size = self.size
        poll_s = self.cfg.poll_ms / 1000.0
        last_t: int | None = None
        last_wall = 0.0
        t_end_sent = -(2**62)
        n = 0
        while not stop.is_set():
            if not self._cam.isRunning():
                self.end_message = f"{self._label} stopped (unplugged?)"
                log.warning("%s after %d events; ending the run", self.end_message, n)
                return
            try:
                batch = self._cam.getNextEventBatch()
            except RuntimeError as e:
                self.end_message = f"{self._label} disconnected: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}"
                log.warning("%s after %d events; ending the run", self.end_message, n)
                return
            if batch is None or batch.size() == 0:
                if last_t is not None:
                    t_end = last_t + 1 + int((time.monotonic() - last_wall) * 1e6)
                    if t_end > t_end_sent:
                        t_end_sent = t_end
                        yield EventPacket(np.zeros(0, EVENT_DTYPE), size, t_end)
                stop.wait(poll_s)
                continue
            ev = batch.numpy()
            last_t, last_wall = int(ev["timestamp"][-1]), time.monotonic()
            n += len(ev)
            t_end_sent = max(t_end_sent, last_t + 1)
            yield EventPacket(ev, size, t_end_sent)


@register_source("camera", "live iniVation camera (DAVIS, DVXplorer) via dv-processing", "camera or camera:DXA00080")
def make_camera_source(arg: str | None, cfg: Config) -> CameraSource:
    return CameraSource(arg, cfg["camera"])
