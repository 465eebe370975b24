"""Ground-truth label files for recordings, and a source wrapper that attaches them to packets.

File format ``spikestream.labels.v1`` -- a numpy ``.npz`` beside the recording
(``rec.aedat4`` -> ``rec.labels.npz``, see :func:`labels_path`), read with
``allow_pickle=False`` (a label file cannot run code).  Two kinds:

``kind = "events"`` (per-event labels; exact, like the synthetic scenes)
    ``t_us`` int64 (N,), ``x`` int16 (N,), ``y`` int16 (N,), ``labels`` int16 (N,):
    0 = background, k > 0 = object k.  An event of the stream gets the label of the
    file entry with the same ``(timestamp, x, y)``.

``kind = "masks"`` (per-time-window masks; what a human annotator draws)
    ``t0_us``, ``t1_us`` int64 (K,) with ``t0 < t1``, windows sorted and not overlapping;
    ``masks`` uint8/int16 (K, H, W): 0 = background, k > 0 = object k.  An event at
    ``(t, x, y)`` with ``t0[k] <= t < t1[k]`` gets ``masks[k, y, x]``.

Both carry ``format = "spikestream.labels.v1"`` and ``kind``.  Events that no entry
covers get label ``-1`` (unlabelled) and are left out of every score: never counted as
background.

Decision: events are matched by *key* ``(t, x, y)``, not by position in the file.  The
alternative (the i-th event of the stream gets the i-th label) breaks as soon as any
node drops, filters, re-chunks or loops the stream; key lookup survives all of these and
costs one ``searchsorted`` per packet.  Two events with the same key (ON and OFF at the
same pixel and microsecond) share the label of the first: they are the same edge.

Time-window labels (``<stem>_labels.csv`` with ``start_us,end_us,label`` columns, as
shipped with the N-MNIST recording) say *when* something is in view, not where; they
are loaded by :func:`load_time_windows` for the "mask on during windows, off in gaps"
check, not turned into per-event labels.
"""
from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from stream.events import EventPacket, SensorSize, StreamReset
from stream.node import RunContext, SourceNode, UsageError

LABELS_FORMAT = "spikestream.labels.v1"
UNLABELLED = -1


@dataclass(frozen=True)
class EventLabels:
    """Per-event ground truth (``kind = "events"``)."""

    t_us: np.ndarray
    x: np.ndarray
    y: np.ndarray
    labels: np.ndarray

    kind = "events"


@dataclass(frozen=True)
class MaskLabels:
    """Per-window masks (``kind = "masks"``)."""

    t0_us: np.ndarray
    t1_us: np.ndarray
    masks: np.ndarray

    kind = "masks"


LabelFile = EventLabels | MaskLabels


def labels_path(recording: str | Path) -> Path:
    """``rec.aedat4`` -> ``rec.labels.npz`` (same folder)."""
    p = Path(recording)
    return p.with_name(p.stem + ".labels.npz")


def save_event_labels(path: str | Path, events: np.ndarray, labels: np.ndarray) -> Path:
    """Write a ``kind = "events"`` file for ``events`` (EVENT_DTYPE) and their ``labels``."""
    labels = np.asarray(labels)
    if len(labels) != len(events):
        raise ValueError(f"{len(labels)} labels for {len(events)} events; give one label per event")
    if len(labels) and labels.min() < 0:
        raise ValueError("labels must be >= 0 (0 background, k object k)")
    p = Path(path)
    with open(p, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to odd names
        np.savez_compressed(
            f, format=np.array(LABELS_FORMAT), kind=np.array("events"),
            t_us=np.asarray(events["timestamp"], np.int64), x=np.asarray(events["x"], np.int16),
            y=np.asarray(events["y"], np.int16), labels=labels.astype(np.int16),
        )
    return p


def save_mask_labels(path: str | Path, t0_us: np.ndarray, t1_us: np.ndarray, masks: np.ndarray) -> Path:
    """Write a ``kind = "masks"`` file: masks (K, H, W) for windows ``[t0_us[k], t1_us[k])``."""
    lab = MaskLabels(np.asarray(t0_us, np.int64), np.asarray(t1_us, np.int64), np.asarray(masks))
    _check_masks(lab, str(path), ValueError)
    p = Path(path)
    with open(p, "wb") as f:
        np.savez_compressed(
            f, format=np.array(LABELS_FORMAT), kind=np.array("masks"),
            t0_us=lab.t0_us, t1_us=lab.t1_us, masks=lab.masks,
        )
    return p


def _check_masks(lab: MaskLabels, where: str, exc: type[Exception]) -> None:
    k = len(lab.t0_us)
    if lab.masks.ndim != 3 or lab.masks.shape[0] != k or len(lab.t1_us) != k:
        raise exc(f"{where}: masks must be (K, H, W) with K = len(t0_us) = len(t1_us); got masks {lab.masks.shape}, "
                  f"{k} t0, {len(lab.t1_us)} t1")
    if not np.issubdtype(lab.masks.dtype, np.integer) or (lab.masks.size and lab.masks.min() < 0):
        raise exc(f"{where}: masks must be non-negative integers (0 background, k object k), got {lab.masks.dtype}")
    if k and (np.any(lab.t1_us <= lab.t0_us) or np.any(lab.t0_us[1:] < lab.t1_us[:-1])):
        raise exc(f"{where}: windows must satisfy t0 < t1, sorted and not overlapping; fix the t0_us/t1_us arrays")


_KEYS = {"events": ("t_us", "x", "y", "labels"), "masks": ("t0_us", "t1_us", "masks")}


def load_labels(path: str | Path) -> LabelFile:
    """Read a label file; raise :class:`UsageError` (one line) when it is missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"label file {p} not found; write one with sources.labels.save_event_labels/save_mask_labels")
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UsageError(f"label file {p} is not a readable .npz ({e}); rewrite it with sources.labels") from None
    fmt = str(data.get("format", ""))
    if fmt != LABELS_FORMAT:
        raise UsageError(f"label file {p} has format {fmt!r}; expected {LABELS_FORMAT!r}")
    kind = str(data.get("kind", ""))
    if kind not in _KEYS:
        raise UsageError(f"label file {p} has kind {kind!r}; allowed: events, masks")
    missing = [k for k in _KEYS[kind] if k not in data]
    if missing:
        raise UsageError(f"label file {p} (kind {kind}) lacks arrays {missing}; needs {list(_KEYS[kind])}")
    if kind == "events":
        n = len(data["t_us"])
        if any(len(data[k]) != n for k in ("x", "y", "labels")):
            raise UsageError(f"label file {p}: t_us, x, y, labels must have equal lengths")
        if n and data["labels"].min() < 0:
            raise UsageError(f"label file {p}: labels must be >= 0 (0 background, k object k)")
        return EventLabels(data["t_us"].astype(np.int64), data["x"].astype(np.int16),
                           data["y"].astype(np.int16), data["labels"].astype(np.int16))
    lab = MaskLabels(data["t0_us"].astype(np.int64), data["t1_us"].astype(np.int64), data["masks"])
    _check_masks(lab, f"label file {p}", UsageError)
    return lab


def find_labels(recording: str | Path) -> LabelFile | None:
    """The label file beside ``recording``, or None when there is none."""
    p = labels_path(recording)
    return load_labels(p) if p.is_file() else None


class Labeller:
    """Looks up ground truth for event arrays: ``labeller(events) -> int16 labels`` (-1 unlabelled)."""

    def __init__(self, lab: LabelFile) -> None:
        self.lab = lab
        if isinstance(lab, EventLabels):
            n = len(lab.t_us)
            self._t0 = int(lab.t_us.min()) if n else 0
            self._w = int(lab.x.max()) + 1 if n else 1
            self._h = int(lab.y.max()) + 1 if n else 1
            span = (int(lab.t_us.max()) - self._t0 + 1) if n else 1
            if span * self._w * self._h >= 2**62:
                raise UsageError("label file spans too long a time for (t, x, y) keys; split the recording")
            keys = self._keys(lab.t_us, lab.x, lab.y)
            order = np.argsort(keys, kind="stable")  # stable: duplicates keep the first label
            self._keys_sorted = keys[order]
            self._labels_sorted = lab.labels[order]

    def _keys(self, t: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # key = (t - t0) * W * H + y * W + x: unique per (t, x, y) inside the file's extent
        return (t.astype(np.int64) - self._t0) * (self._w * self._h) + y.astype(np.int64) * self._w + x.astype(np.int64)

    def __call__(self, events: np.ndarray) -> np.ndarray:
        out = np.full(len(events), UNLABELLED, dtype=np.int16)
        if len(events) == 0:
            return out
        t, x, y = events["timestamp"], events["x"].astype(np.int64), events["y"].astype(np.int64)
        if isinstance(self.lab, EventLabels):
            inside = (t >= self._t0) & (x >= 0) & (x < self._w) & (y >= 0) & (y < self._h)
            if not np.any(inside) or len(self._keys_sorted) == 0:
                return out
            keys = self._keys(t[inside], x[inside], y[inside])
            pos = np.minimum(np.searchsorted(self._keys_sorted, keys), len(self._keys_sorted) - 1)
            hit = self._keys_sorted[pos] == keys
            sub = np.full(len(keys), UNLABELLED, dtype=np.int16)
            sub[hit] = self._labels_sorted[pos[hit]]
            out[inside] = sub
            return out
        lab = self.lab
        k = np.searchsorted(lab.t0_us, t, side="right") - 1  # last window starting at or before t
        _, h, w = lab.masks.shape
        ok = (k >= 0) & (x >= 0) & (x < w) & (y >= 0) & (y < h)
        ok[ok] &= t[ok] < lab.t1_us[k[ok]]
        out[ok] = lab.masks[k[ok], y[ok], x[ok]].astype(np.int16)
        return out


class LabelledSource(SourceNode):
    """Wraps a source and attaches ground truth to every :class:`EventPacket` (``packet.labels``).

    Everything else (size, live, open, close, resets) is the inner source's.  Counters
    ``n_labelled`` / ``n_unlabelled`` say how much of the stream the file covered.
    """

    def __init__(self, inner: SourceNode, labels: LabelFile) -> None:
        self.inner = inner
        self.labeller = Labeller(labels)
        self.name = f"{inner.name}+labels"
        self.live = inner.live
        self.n_labelled = 0
        self.n_unlabelled = 0

    @property
    def size(self) -> SensorSize:
        return self.inner.size

    def describe(self) -> str:
        return self.inner.describe()

    def open(self, ctx: RunContext) -> None:
        self.inner.open(ctx)

    def close(self) -> None:
        self.inner.close()

    def packets(self) -> Iterator[EventPacket | StreamReset]:
        for item in self.inner.packets():
            if isinstance(item, EventPacket) and len(item.events):
                lab = self.labeller(item.events)
                n_bad = int(np.count_nonzero(lab < 0))
                self.n_unlabelled += n_bad
                self.n_labelled += len(lab) - n_bad
                item = EventPacket(item.events, item.size, item.t_end_us, lab)
            yield item


def time_windows_path(recording: str | Path) -> Path | None:
    """``rec.aedat4`` -> ``rec_labels.csv`` or ``rec.labels.csv`` if either exists."""
    p = Path(recording)
    for cand in (p.with_name(p.stem + "_labels.csv"), p.with_name(p.stem + ".labels.csv")):
        if cand.is_file():
            return cand
    return None


def load_time_windows(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read a CSV with ``start_us,end_us,label`` columns: ``((K, 2) int64 [start, end), labels)``."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"time-window file {p} not found")
    rows: list[tuple[int, int]] = []
    names: list[str] = []
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"start_us", "end_us", "label"}
        if not need <= set(reader.fieldnames or ()):
            raise UsageError(f"time-window file {p} needs columns start_us,end_us,label; has {reader.fieldnames}")
        for i, r in enumerate(reader, start=2):
            try:
                s, e = int(r["start_us"]), int(r["end_us"])
            except ValueError:
                raise UsageError(f"time-window file {p} line {i}: start_us/end_us must be integers") from None
            if e <= s:
                raise UsageError(f"time-window file {p} line {i}: end_us {e} <= start_us {s}")
            rows.append((s, e))
            names.append(r["label"])
    return np.array(rows, dtype=np.int64).reshape(-1, 2), names
