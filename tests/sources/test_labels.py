"""Label files: round trip, lookup that survives re-chunking and filtering, the source wrapper."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import dv_processing as dv
import numpy as np
import pytest

from sources import labels as L
from stream.events import EventPacket, SensorSize, StreamReset, make_events
from stream.node import RunContext, SourceNode, UsageError

SIZE = SensorSize(32, 24)
REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "real"


def _events(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(1_000_000, 1_050_000, n))
    ev = make_events(t, rng.integers(0, SIZE.width, n), rng.integers(0, SIZE.height, n), rng.integers(0, 2, n))
    # labels a function of position so duplicates of (t, x, y) agree
    lab = np.where(ev["x"] < 10, 1, np.where(ev["x"] > 25, 2, 0)).astype(np.int16)
    return ev, lab


def test_labels_path() -> None:
    assert L.labels_path("/a/rec.aedat4") == Path("/a/rec.labels.npz")


def test_event_labels_round_trip(tmp_path: Path) -> None:
    ev, lab = _events()
    p = L.save_event_labels(tmp_path / "rec.labels.npz", ev, lab)
    got = L.load_labels(p)
    assert isinstance(got, L.EventLabels)
    assert np.array_equal(got.t_us, ev["timestamp"]) and np.array_equal(got.labels, lab)
    assert np.array_equal(got.x, ev["x"]) and np.array_equal(got.y, ev["y"])
    assert np.array_equal(L.Labeller(got)(ev), lab)


def test_mask_labels_round_trip_and_lookup(tmp_path: Path) -> None:
    masks = np.zeros((2, SIZE.height, SIZE.width), np.uint8)
    masks[0, 0:5, 0:5] = 1
    masks[1, 10:20, 10:20] = 3
    p = L.save_mask_labels(tmp_path / "m.labels.npz", [0, 100], [100, 150], masks)
    got = L.load_labels(p)
    assert isinstance(got, L.MaskLabels) and np.array_equal(got.masks, masks)
    ev = make_events([0, 99, 99, 100, 149, 150, -5], [1, 1, 12, 12, 12, 12, 1], [1, 1, 12, 12, 12, 12, 1], [1] * 7)
    assert L.Labeller(got)(ev).tolist() == [1, 1, 0, 3, 3, -1, -1]


def test_lookup_survives_rechunking_filtering_and_unknown_events() -> None:
    ev, lab = _events()
    labeller = L.Labeller(L.EventLabels(ev["timestamp"], ev["x"], ev["y"], lab))
    keep = np.arange(len(ev)) % 3 != 0  # a filter dropped a third of the events
    sub, sub_lab = ev[keep], lab[keep]
    got = np.concatenate([labeller(sub[i : i + 17]) for i in range(0, len(sub), 17)])
    assert np.array_equal(got, sub_lab)
    # events not in the file (before it, outside its extent, an unknown key) are unlabelled
    known = set(zip(ev["timestamp"].tolist(), ev["x"].tolist(), ev["y"].tolist()))
    assert (int(ev["timestamp"][5]), 31, 23) not in known
    stranger = make_events([999, int(ev["timestamp"][5]), 2_000_000], [0, 31, 40], [0, 23, 0], [1, 1, 1])
    assert labeller(stranger).tolist() == [-1, -1, -1]


def test_malformed_files_are_loud(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        L.load_labels(tmp_path / "nope.labels.npz")
    bad = tmp_path / "bad.labels.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="not a readable"):
        L.load_labels(bad)
    wrong = tmp_path / "wrong.labels.npz"
    with open(wrong, "wb") as f:
        np.savez(f, format=np.array(L.LABELS_FORMAT), kind=np.array("events"), t_us=np.zeros(3, np.int64))
    with pytest.raises(UsageError, match="lacks arrays"):
        L.load_labels(wrong)
    with pytest.raises(ValueError, match="not overlapping"):
        L.save_mask_labels(tmp_path / "o.npz", [0, 50], [100, 150], np.zeros((2, 4, 4), np.uint8))


class _ListSource(SourceNode):
    name = "list"

    def __init__(self, items: list) -> None:
        self.items = items
        self.opened = self.closed = False

    @property
    def size(self) -> SensorSize:
        return SIZE

    def open(self, ctx: RunContext) -> None:
        self.opened = True

    def close(self) -> None:
        self.closed = True

    def packets(self) -> Iterator[EventPacket | StreamReset]:
        yield from self.items


def _dv_write_read(path: Path, ev: np.ndarray, batch: int) -> list[np.ndarray]:
    """Write ``ev`` to a real .aedat4 with dv-processing, read it back in the writer's batches."""
    writer = dv.io.MonoCameraWriter(str(path), dv.io.MonoCameraWriter.EventOnlyConfig("test", (SIZE.width, SIZE.height)))
    for i in range(0, len(ev), batch):
        store = dv.EventStore()
        for e in ev[i : i + batch]:
            store.push_back(int(e["timestamp"]), int(e["x"]), int(e["y"]), bool(e["polarity"]))
        writer.writeEvents(store)
    del writer  # the writer finalises the file when destroyed
    reader = dv.io.MonoCameraRecording(str(path))
    out = []
    while (b := reader.getNextEventBatch()) is not None:
        out.append(b.numpy().copy())
    return out


def test_labelled_source_on_a_real_aedat4(tmp_path: Path) -> None:
    ev, lab = _events(300, seed=1)
    rec = tmp_path / "rec.aedat4"
    batches = _dv_write_read(rec, ev, batch=64)
    assert sum(len(b) for b in batches) == len(ev)
    L.save_event_labels(L.labels_path(rec), ev, lab)
    found = L.find_labels(rec)
    assert found is not None
    items = [EventPacket(b, SIZE) for b in batches]
    items.insert(2, StreamReset("loop"))
    items.append(EventPacket(make_events([], [], [], []), SIZE, t_end_us=2_000_000))
    inner = _ListSource(items)
    src = L.LabelledSource(inner, found)
    src.open(RunContext(stop=threading.Event(), metrics=None))
    out = list(src.packets())
    src.close()
    assert inner.opened and inner.closed and src.size == SIZE
    assert isinstance(out[2], StreamReset)
    got = np.concatenate([p.labels for p in out if isinstance(p, EventPacket) and len(p)])
    assert np.array_equal(got, lab)
    assert src.n_labelled == len(ev) and src.n_unlabelled == 0
    assert L.find_labels(tmp_path / "other.aedat4") is None


def test_time_windows_csv(tmp_path: Path) -> None:
    p = tmp_path / "rec_labels.csv"
    p.write_text("start_us,end_us,label\n0,100,7\n200,300,8\n")
    assert L.time_windows_path(tmp_path / "rec.aedat4") == p
    win, names = L.load_time_windows(p)
    assert win.tolist() == [[0, 100], [200, 300]] and names == ["7", "8"]
    p.write_text("start_us,end_us,label\n100,50,1\n")
    with pytest.raises(UsageError, match="end_us"):
        L.load_time_windows(p)


@pytest.mark.real_data
def test_nmnist_windows_file() -> None:
    rec = REAL / "07_nmnist_10digits.aedat4"
    if not rec.is_file():
        pytest.skip("shared real data absent")
    path = L.time_windows_path(rec)
    assert path is not None
    win, names = L.load_time_windows(path)
    assert len(win) == 10 and names[:3] == ["0", "1", "2"] and np.all(win[1:, 0] > win[:-1, 1])
