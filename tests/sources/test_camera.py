"""Live camera: the no-camera message on this machine (real dv), and the polling loop
against a scripted stand-in for ``dv.io.camera`` (no hardware here)."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from stream.config import Config, build
from stream.events import SensorSize
from stream.metrics import Metrics
from stream.node import NodeError, RunContext
from stream.registry import build_source
from sources.camera import CameraConfig, CameraSource
from tests.sources.aedat_util import random_events, to_store


def ctx() -> RunContext:
    return RunContext(stop=threading.Event(), metrics=Metrics())


def test_no_camera_message_with_real_dv() -> None:
    src = build_source("camera", Config({"camera": build(CameraConfig, {})}))
    with pytest.raises(NodeError) as e:
        src.open(ctx())
    msg = str(e.value)
    assert "no event camera found" in msg and "--source FILE.aedat4" in msg and "--source synthetic" in msg
    assert "\n" not in msg
    src.close()


class FakeCam:
    """Plays a script: a batch, None (quiet) or "unplug" / "raise" per poll."""

    def __init__(self, script: list) -> None:
        self.script = list(script)
        self.running = True

    def getEventResolution(self) -> tuple[int, int]:
        return (640, 480)

    def isRunning(self) -> bool:
        return self.running

    def getNextEventBatch(self):
        item = self.script.pop(0) if self.script else "unplug"
        if item == "unplug":
            self.running = False
            return None
        if item == "raise":
            raise RuntimeError("libusb: device disconnected")
        return item


class FakeApi:
    def __init__(self, serials: list[str], cam: FakeCam) -> None:
        self.devices = [SimpleNamespace(serialNumber=s, cameraModel=SimpleNamespace(name="DVXPLORER")) for s in serials]
        self.cam = cam
        self.opened = None

    def discover(self):
        return self.devices

    def open(self, dev):
        self.opened = dev.serialNumber
        return self.cam


def test_serial_not_found_lists_serials() -> None:
    api = FakeApi(["DXA00080", "DXA00099"], FakeCam([]))
    src = CameraSource("DXA12345", build(CameraConfig, {}), camera_api=api)
    with pytest.raises(NodeError, match=r"camera DXA12345 not found; serials found: DXA00080, DXA00099"):
        src.open(ctx())


@pytest.mark.parametrize("ending", ["unplug", "raise"])
def test_polls_sends_empty_packets_and_ends_cleanly(ending: str) -> None:
    ev = random_events(300, (640, 480), seed=1)
    script = [to_store(ev[:100]), None, None, None, to_store(ev[100:]), None, ending]
    api = FakeApi(["DXA00080", "DXA00099"], FakeCam(script))
    src = CameraSource("DXA00099", build(CameraConfig, {"poll_ms": 1.0}), camera_api=api)
    src.open(ctx())
    assert api.opened == "DXA00099" and src.size == SensorSize(640, 480) and src.live
    items = list(src.packets())
    src.close()
    # "unplug" is seen on the poll after an empty read, which still sends its progress packet
    assert [len(p) for p in items] == [100, 0, 0, 0, 200, 0] + ([0] if ending == "unplug" else [])
    got = np.concatenate([p.events["timestamp"] for p in items])
    assert np.array_equal(got, ev["timestamp"])  # sensor time kept as is
    ends = [p.t_end_us for p in items]
    assert ends[0] == int(ev["timestamp"][99]) + 1
    assert ends[1] > ends[0] and ends[2] > ends[1] and ends[3] > ends[2]  # wall clock moves sensor time
    assert ends[4] == max(int(ev["timestamp"][-1]) + 1, ends[3])
    assert ("stopped" if ending == "unplug" else "disconnected") in src.end_message


def test_stop_ends_a_quiet_camera() -> None:
    c = ctx()
    api = FakeApi(["X"], FakeCam([None] * 100_000))  # 100 s of quiet polls at 1 ms
    src = CameraSource(None, build(CameraConfig, {"poll_ms": 1.0}), camera_api=api)
    src.open(c)
    timer = threading.Timer(0.05, c.stop.set)
    timer.start()
    items = list(src.packets())  # returns once stop is seen (within one poll)
    timer.join()
    assert items == []  # no event yet: nothing to promise
    assert len(api.cam.script) > 90_000
