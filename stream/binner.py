"""Binning: events -> fixed-duration time steps, each a (C, H, W) count tensor.

Rules (the engine issue):

* Bins are ``[t0, t0 + bin_us)`` aligned to the first event after the start or a
  :class:`StreamReset`.  **Empty bins are emitted**: time moves on and neurons must leak.
* A bin closes when an event at or after its end arrives, or when the source promises
  completeness up to its end (``EventPacket.t_end_us``): that is how live sources close
  bins on the wall clock while the scene is still.
* Events outside the sensor are dropped and counted (``drops.out_of_range``); events
  going back in time -- earlier than an event already seen -- are dropped and counted
  (``drops.backwards``).  Duplicated timestamps are kept.  Never a crash.
* A silence longer than ``gap_reset_s`` does not emit millions of empty bins: the
  binner emits a :class:`StreamReset` ("gap") and re-aligns to the next event.  After a
  gap that long every leaky layer is back at rest anyway; only the IF layer (Conv3)
  would have kept a sub-threshold membrane, which the reset clears -- documented, and
  counted as ``binner.gap_resets``.  The alternative (emitting every empty bin) makes
  an hour of silence cost half an hour of compute before the next event shows.

Channels: ``polarity: split`` gives C = 2 (0 = OFF, 1 = ON); ``merge`` gives C = 1.

The count image is built by one compiled pass over the structured array (numba),
PERF-NOTES' fastest method (170-200 Mev/s); outputs far larger than the cache with
about one event per cache line take a tiled pass instead (``_bin_tiled_kernel``).  A
pure-numpy fallback exists for platforms without numba and is what the tests compare
against.  The Binner recycles its one-bin frames (``Binner._frame_buffer``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .buffers import BufferPool
from .config import section
from .events import EventPacket, SensorSize, Step, StreamReset, concat_events, take_events

try:  # numba is a declared dependency; the fallback keeps the maths importable without it
    import numba

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only on platforms without numba
    numba = None
    _HAVE_NUMBA = False


@section("binner")
@dataclass(frozen=True)
class BinnerConfig:
    """``bin_us``: step duration in µs of sensor time.  ``polarity``: split (C=2) or merge (C=1).

    ``gap_reset_s``: a silence longer than this resets the stream instead of emitting
    every empty bin.  ``live_close_ms``: for live sources, how often (wall time) the
    source reports progress so bins close on a still scene.
    """

    bin_us: int = 1000
    polarity: Literal["split", "merge"] = "split"
    gap_reset_s: float = 1.0
    live_close_ms: float = 2.0

    def __post_init__(self) -> None:
        if not 10 <= self.bin_us <= 10_000_000:
            raise ValueError(f"bin_us={self.bin_us} out of range; use 10 .. 10000000 µs")
        if self.gap_reset_s <= 0:
            raise ValueError(f"gap_reset_s={self.gap_reset_s} must be > 0 seconds")
        if not 0.1 <= self.live_close_ms <= 1000:
            raise ValueError(f"live_close_ms={self.live_close_ms} out of range; use 0.1 .. 1000")

    @property
    def channels(self) -> int:
        return 2 if self.polarity == "split" else 1


def _out_buffer(out: np.ndarray | None, nbins: int, c: int, h: int, w: int) -> np.ndarray:
    """A zeroed (nbins, c, h, w) float32 frame: ``out`` cleared in place, or a new one."""
    if out is None:
        return np.zeros((nbins, c, h, w), dtype=np.float32)
    if out.shape != (nbins, c, h, w) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {(nbins, c, h, w)}, got {out.dtype} {out.shape}")
    out.fill(0.0)
    return out


def _bin_numpy(events: np.ndarray, t0: int, bin_us: int, nbins: int, c: int, h: int, w: int, out: np.ndarray | None = None) -> np.ndarray:
    """Reference: counts[k, p, y, x] for events with k = (t - t0) // bin_us in [0, nbins)."""
    out = _out_buffer(out, nbins, c, h, w)
    if len(events):
        k = (events["timestamp"] - t0) // bin_us
        p = events["polarity"].astype(np.int64) if c == 2 else 0
        flat = ((k * c + p) * h + events["y"].astype(np.int64)) * w + events["x"].astype(np.int64)
        out.reshape(-1)[:] += np.bincount(flat, minlength=out.size).astype(np.float32)
    return out


#: Tiled binning (see _bin_tiled_kernel): outputs of at least this size, with at most this
#: many events per 64-byte line (16 float32) on average; tiles of 2 MB = 2**19 float32.
_TILED_MIN_BYTES = 32 * 1024 * 1024
_TILED_MAX_EVENTS_PER_LINE = 2
_TILE_BYTES = 2 * 1024 * 1024
_TILE_SHIFT = 19

if _HAVE_NUMBA:

    @numba.njit(cache=True, nogil=True)
    def _bin_kernel(ts, xs, ys, ps, t0, bin_us, out, c):  # pragma: no cover - compiled
        # One pass, written for the memory system (measured at 1280x720, 1 M events in 10
        # bins: 28 -> 39 Mev/s; benchmarks/README.md, "binning"):
        # * no 64-bit division per event: events arrive in time order (the Binner cleans
        #   them forward-only), so the bin index only changes at bin edges; an event outside
        #   the current [lo, hi) (a new bin, or unsorted input from another caller) falls
        #   back to the division, so the result is the same for any order.
        # * a flat index into the C-contiguous output instead of 4-D indexing.
        _, _, h, w = out.shape
        flat = out.reshape(-1)
        hw = h * w
        k = 0
        lo = t0
        hi = t0 + bin_us
        for i in range(ts.shape[0]):
            t = ts[i]
            if t >= hi or t < lo:
                k = (t - t0) // bin_us
                lo = t0 + k * bin_us
                hi = lo + bin_us
            ch = np.int64(ps[i]) if c == 2 else 0
            flat[(k * c + ch) * hw + np.int64(ys[i]) * w + np.int64(xs[i])] += 1.0

    @numba.njit(cache=True, nogil=True)
    def _bin_tiled_kernel(ts, xs, ys, ps, t0, bin_us, out, c, first, shift):  # pragma: no cover - compiled
        # The same counts as _bin_kernel, for outputs far larger than the cache with about
        # one event per cache line (1 M events at 1280x720 in 10 bins: 74 MB, 0.9 events
        # per line).  There each event's read-modify-write misses the cache, and each
        # fresh 2 MB page is cleared by the kernel on first touch.  So: counting-sort the
        # flat indices by tile (a tile = one 2 MB page: element i + first >> shift), then
        # per tile fault the page in (one store per 4 KB, values already 0) and do its
        # increments while it is in cache.  Measured 37-39 -> 48-56 Mev/s (1 M @ HD);
        # slower when events are dense per line (10 M @ HD: 97 -> 77), hence the
        # dispatch in bin_events.
        _, _, h, w = out.shape
        flat = out.reshape(-1)
        n = ts.shape[0]
        hw = h * w
        ntiles = ((flat.size + first) >> shift) + 1
        start = np.zeros(ntiles + 1, np.int64)
        idx = np.empty(n, np.int32)  # the caller checks flat.size < 2**31
        k = 0
        lo = t0
        hi = t0 + bin_us
        for i in range(n):
            t = ts[i]
            if t >= hi or t < lo:
                k = (t - t0) // bin_us
                lo = t0 + k * bin_us
                hi = lo + bin_us
            ch = np.int64(ps[i]) if c == 2 else 0
            o = (k * c + ch) * hw + np.int64(ys[i]) * w + np.int64(xs[i])
            idx[i] = o
            start[((o + first) >> shift) + 1] += 1
        for b in range(ntiles):
            start[b + 1] += start[b]
        fill = start[:-1].copy()
        by_tile = np.empty(n, np.int32)
        for i in range(n):
            b = (idx[i] + first) >> shift
            by_tile[fill[b]] = idx[i]
            fill[b] += 1
        for b in range(ntiles):
            a0 = start[b]
            a1 = start[b + 1]
            if a1 == a0:
                continue
            for j in range(max((b << shift) - first, 0), min(((b + 1) << shift) - first, flat.size), 1024):
                flat[j] = 0.0
            for j in range(a0, a1):
                flat[by_tile[j]] += 1.0

    def bin_events(events: np.ndarray, t0: int, bin_us: int, nbins: int, c: int, h: int, w: int, out: np.ndarray | None = None) -> np.ndarray:
        """Count image (nbins, c, h, w) float32 of events already validated to lie in range.

        ``out``: a buffer to fill (cleared first; the :class:`Binner` recycles its frames
        this way); by default a new zeroed array.
        """
        out = _out_buffer(out, nbins, c, h, w)
        n = len(events)
        if n and out.nbytes >= _TILED_MIN_BYTES and n * 16 <= _TILED_MAX_EVENTS_PER_LINE * out.size and out.size < 2**31:
            first = (out.ctypes.data % _TILE_BYTES) // 4  # tiles aligned to 2 MB pages
            _bin_tiled_kernel(events["timestamp"], events["x"], events["y"], events["polarity"], np.int64(t0), np.int64(bin_us),
                              out, c, np.int64(first), np.int64(_TILE_SHIFT))
        elif n:
            _bin_kernel(events["timestamp"], events["x"], events["y"], events["polarity"], np.int64(t0), np.int64(bin_us), out, c)
        return out

else:  # pragma: no cover
    bin_events = _bin_numpy


def _scan_numpy(t: np.ndarray, x: np.ndarray, y: np.ndarray, w: int, h: int, t_floor: int, keep: np.ndarray) -> tuple[int, int]:
    """Reference for :func:`_scan_kernel` (platforms without numba; the tests compare both)."""
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    # running max of the inside events *and* t_floor before each event
    running = np.maximum.accumulate(np.where(inside, t, np.iinfo(np.int64).min))
    prev_max = np.maximum(np.concatenate(([np.iinfo(np.int64).min], running[:-1])), t_floor)
    forward = t >= prev_max
    keep[:] = inside & forward
    return int(len(t) - np.count_nonzero(inside)), int(np.count_nonzero(inside & ~forward))


if _HAVE_NUMBA:

    @numba.njit(cache=True, nogil=True)
    def _scan_kernel(ts, xs, ys, w, h, t_floor, keep):  # pragma: no cover - compiled
        # One pass instead of ~10 numpy passes over strided fields (254 -> ~20 µs per
        # 20,000 events, measured; benchmarks/README.md "e2e").
        n_out = 0
        n_back = 0
        running = t_floor
        for i in range(ts.shape[0]):
            x = xs[i]
            y = ys[i]
            if x < 0 or x >= w or y < 0 or y >= h:
                keep[i] = False
                n_out += 1
                continue
            t = ts[i]
            if t < running:
                keep[i] = False
                n_back += 1
            else:
                keep[i] = True
                running = t
        return n_out, n_back

else:  # pragma: no cover
    _scan_kernel = _scan_numpy


def scan_events(events: np.ndarray, size: SensorSize, t_floor: int) -> tuple[int, int, np.ndarray]:
    """``(n_out_of_range, n_backwards, keep)`` for ``events`` after a stream whose latest
    timestamp is ``t_floor``: an event is kept if it lies on the sensor and is not earlier
    than ``t_floor`` nor than any kept event before it."""
    keep = np.empty(len(events), dtype=np.bool_)
    if len(events) == 0:
        return 0, 0, keep
    n_out, n_back = _scan_kernel(events["timestamp"], events["x"], events["y"], size.width, size.height, np.int64(t_floor), keep)
    return int(n_out), int(n_back), keep


def clean_events(events: np.ndarray, size: SensorSize, t_floor: int) -> tuple[np.ndarray, int, int, np.ndarray | None]:
    """Drop out-of-sensor events and events earlier than an event already seen.

    ``t_floor`` is the latest timestamp seen before this packet.  Returns
    ``(kept_events, n_out_of_range, n_backwards, keep_mask_or_None)``; the mask is None
    when nothing was dropped (the common case: one compiled pass, no copy).
    """
    if len(events) == 0:
        return events, 0, 0, None
    n_out, n_back, keep = scan_events(events, size, t_floor)
    if n_out == 0 and n_back == 0:
        return events, 0, 0, None
    return take_events(events, keep), n_out, n_back, keep


#: Bounds of the Binner's recycled frames (see Binner._frame_buffer).
_POOL_FRAMES = 32
_POOL_BYTES = 64 * 1024 * 1024


class Binner:
    """Turns :class:`EventPacket`/:class:`StreamReset` items into :class:`Step` items.

    Not a thread: the engine calls :meth:`process` from the source thread (binning is
    cheap, and one thread less means one queue less between a live reader and its bins).
    """

    name = "binner"

    def __init__(self, cfg: BinnerConfig, size: SensorSize, device: torch.device | str = "cpu", source: str = "", metrics=None) -> None:
        self.cfg = cfg
        self.size = size
        self.device = torch.device(device)
        self.source = source
        self.metrics = metrics
        self.next_index = 0  # step index since the stream started (never reset)
        self._frames = BufferPool(_POOL_FRAMES, _POOL_BYTES)  # recycled one-bin frames
        self._restart()

    # -- state --------------------------------------------------------------------
    def _restart(self) -> None:
        self.t0: int | None = None  # start of the open bin
        self.t_seen = np.iinfo(np.int64).min  # latest event timestamp accepted
        self._pending: list[np.ndarray] = []
        self._pending_labels: list[np.ndarray] = []
        self._has_labels = False

    def _frame_buffer(self, nbins: int, c: int, h: int, w: int) -> np.ndarray | None:
        """A recycled one-bin frame buffer (see :class:`stream.buffers.BufferPool`), or None (allocate).

        Why: a fresh 720 KB frame at 346x260 is above glibc's mmap threshold, and its page
        faults cost ~150 µs per bin -- more than binning 20,000 events; at 1 ms bins that
        alone capped a replay near 1,300 steps/s.  Only for CPU frames (CUDA copies them anyway).
        """
        if nbins != 1 or self.device.type != "cpu":
            return None
        return self._frames.take((1, c, h, w), np.float32)

    def _count(self, key: str, n: int) -> None:
        if n and self.metrics is not None:
            self.metrics.inc(key, n)

    # -- main entry -----------------------------------------------------------------
    def process(self, item: EventPacket | StreamReset) -> list[Step | StreamReset]:
        if isinstance(item, StreamReset):
            out: list[Step | StreamReset] = list(self.flush())
            if item.size is not None:
                self.size = item.size
            self._restart()
            out.append(item)
            return out
        return self._packet(item)

    def flush(self) -> list[Step]:
        """Close the open bin (end of stream or reset) if it holds events."""
        if self.t0 is None or not self._pending or not any(len(p) for p in self._pending):
            return []
        return self._close_bins(self.t0 + self.cfg.bin_us)

    def _packet(self, pkt: EventPacket) -> list[Step | StreamReset]:
        if pkt.size != self.size:
            # A live source never changes size mid-stream; files do so only behind a reset.
            raise ValueError(f"packet size {pkt.size} differs from the stream's {self.size} without a reset")
        events, n_out, n_back, keep = clean_events(pkt.events, self.size, self.t_seen)
        self._count("drops.out_of_range", n_out)
        self._count("drops.backwards", n_back)
        labels = pkt.labels if keep is None or pkt.labels is None else pkt.labels[keep]
        out: list[Step | StreamReset] = []
        if len(events):
            self.t_seen = int(events["timestamp"][-1])
            first_t = int(events["timestamp"][0])
            if self.t0 is None:
                self.t0 = first_t
            elif first_t >= self.t0 + self.cfg.bin_us + int(self.cfg.gap_reset_s * 1e6):
                # Long silence: close what is open, re-align at this event.
                out.extend(self.flush())
                out.append(StreamReset(f"gap of {(first_t - self.t0) / 1e6:.1f} s in the input", source=self.source))
                self._count("binner.gap_resets", 1)
                self._restart()
                self.t_seen = int(events["timestamp"][-1])
                self.t0 = first_t
            self._pending.append(events)
            if labels is not None:
                self._has_labels = True
                self._pending_labels.append(np.asarray(labels, dtype=np.int16))
            elif self._has_labels:
                self._pending_labels.append(np.zeros(len(events), dtype=np.int16))
        if self.t0 is None:
            return out
        # Everything before `horizon` is complete: the latest event, or the source's promise.
        horizon = self.t_seen
        if pkt.t_end_us is not None:
            horizon = max(horizon, int(pkt.t_end_us))
            if pkt.t_end_us > self.t_seen:
                self.t_seen = max(self.t_seen, int(pkt.t_end_us) - 1)
        n_closable = (horizon - self.t0) // self.cfg.bin_us
        if len(events) == 0 and pkt.t_end_us is not None and n_closable > 0:
            n_closable = (int(pkt.t_end_us) - self.t0) // self.cfg.bin_us
        if n_closable > 0:
            out.extend(self._close_bins(self.t0 + n_closable * self.cfg.bin_us))
        return out

    def _close_bins(self, t_end: int) -> list[Step]:
        """Emit every bin from the open one up to ``t_end`` (exclusive), empty ones included."""
        assert self.t0 is not None  # internal invariant, not input validation
        bin_us = self.cfg.bin_us
        nbins = (t_end - self.t0) // bin_us
        if nbins <= 0:
            return []
        if self._pending:
            allev = self._pending[0] if len(self._pending) == 1 else concat_events(self._pending)
            alllab = None
            if self._has_labels:
                alllab = self._pending_labels[0] if len(self._pending_labels) == 1 else np.concatenate(self._pending_labels)
        else:
            allev, alllab = self._pending_empty(), None
        split = int(np.searchsorted(allev["timestamp"], t_end, side="left"))
        closing, rest = allev[:split], allev[split:]
        c, h, w = self.cfg.channels, self.size.height, self.size.width
        frames = bin_events(closing, self.t0, bin_us, nbins, c, h, w, out=self._frame_buffer(nbins, c, h, w))
        edges = self.t0 + bin_us * np.arange(nbins + 1, dtype=np.int64)
        cuts = np.searchsorted(closing["timestamp"], edges, side="left")
        now = time.perf_counter_ns()
        frames_t = torch.from_numpy(frames)
        if self.device.type != "cpu":
            frames_t = frames_t.pin_memory().to(self.device, non_blocking=True)
        steps = []
        for k in range(nbins):
            a, b = int(cuts[k]), int(cuts[k + 1])
            steps.append(
                Step(
                    index=self.next_index,
                    t0_us=int(edges[k]),
                    t1_us=int(edges[k + 1]),
                    frame=frames_t[k],
                    events=closing[a:b],
                    size=self.size,
                    closed_ns=now,
                    labels=None if alllab is None else alllab[a:b],
                    source=self.source,
                )
            )
            self.next_index += 1
        self.t0 = t_end
        self._pending = [rest] if len(rest) else []
        if alllab is not None:
            self._pending_labels = [alllab[split:]] if len(rest) else []
        return steps

    @staticmethod
    def _pending_empty() -> np.ndarray:
        from .events import empty_events

        return empty_events(0)
