"""The real recordings in ../shared/data/real (skipped when absent): counts and geometry."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from stream.config import build
from stream.events import EventPacket, SensorSize
from stream.metrics import Metrics
from stream.node import RunContext
from sources.aedat4 import Aedat4Source, ReplayConfig

REAL = Path(__file__).resolve().parents[2].parent / "shared/data/real"
pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} absent"),
]


@pytest.mark.parametrize(
    "name,count,size",
    [
        ("01_dvxplorer_person.aedat4", 111_954, (320, 240)),
        ("04_prophesee_gen3_spinner.aedat4", 539_481, (640, 480)),
        ("07_nmnist_10digits.aedat4", 42_661, (34, 34)),
    ],
)
def test_real_recording(name: str, count: int, size: tuple[int, int]) -> None:
    src = Aedat4Source(str(REAL / name), build(ReplayConfig, {"progress": False}))
    src.open(RunContext(stop=threading.Event(), metrics=Metrics()))
    n, last = 0, None
    try:
        for p in src.packets():
            assert isinstance(p, EventPacket) and p.size == SensorSize(*size)
            t = p.events["timestamp"]
            assert last is None or t[0] >= last
            assert p.events["x"].max() < size[0] and p.events["y"].max() < size[1]
            last = int(t[-1])
            n += len(p)
    finally:
        src.close()
    assert src.size == SensorSize(*size) and n == count


def test_directory_of_real_recordings() -> None:
    src = Aedat4Source(str(REAL), build(ReplayConfig, {"progress": False}))
    src.open(RunContext(stop=threading.Event(), metrics=Metrics()))
    items = list(src.packets())
    src.close()
    resets = [i.size for i in items if not isinstance(i, EventPacket)]
    assert resets == [SensorSize(640, 480), SensorSize(34, 34)]
    assert sum(len(i) for i in items if isinstance(i, EventPacket)) == 111_954 + 539_481 + 42_661
